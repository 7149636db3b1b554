"""LightGlue (Lindenberger et al., ICCV 2023) for stored SuperPoint features, for batches of
padded pairs: rotary keypoint encoding, 9 self + cross attention layers, double-softmax
assignment, with adaptive depth (a pair stops once its keypoints are confident) and width
(unmatchable keypoints are pruned).

Each image's keypoints are normalised by its own size. Every pair of a batch stops and prunes on
its own, so it gets what it gets alone. Parameter names are those of transformers'
``LightGlueForKeypointMatching`` (``weights`` converts cvg/LightGlue's layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEARNED_OPTIONS
from .learned import PaddedFeatures, mutual_matches

DEFAULTS = LEARNED_OPTIONS["lightglue"]


def normalize_keypoints(keypoints: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """Pixels (B, N, 2) to LightGlue's frame: centred, divided by half the image's longer side."""
    size = image_size.to(keypoints)
    return (keypoints - size[:, None] / 2) / (size.amax(1)[:, None, None] / 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2, x3, x4 ...) -> (-x2, x1, -x4, x3 ...): rotation of each channel pair by 90 degrees."""
    first, second = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-second, first), -1).flatten(-2)


class PositionalEncoder(nn.Module):
    """Learnt Fourier features of the keypoints: (B, 2, N, head_dim), cosines then sines."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.projector = nn.Linear(2, head_dim // 2, bias=False)

    def forward(self, keypoints: torch.Tensor) -> torch.Tensor:
        projected = self.projector(keypoints).repeat_interleave(2, -1)
        return torch.stack([projected.cos(), projected.sin()], 1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` on ``source`` (rotary-encoded with ``encoding`` for self
    attention); padded keys (``mask`` False) are ignored."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None, encoding: torch.Tensor | None
    ) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(source)), split(self.v_proj(source))
        if encoding is not None:
            cos, sin = encoding[:, :1], encoding[:, 1:]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attn_mask = None if mask is None else mask[:, None, None, :]
        message = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(message.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """The update from [descriptor, message]: linear, LayerNorm, GELU, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, 2 * dim)
        self.layer_norm = nn.LayerNorm(2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.layer_norm(self.fc1(x))))


class TransformerLayer(nn.Module):
    """Self attention in each image, then cross attention between the two."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attention, self.self_mlp = Attention(dim, heads), MLP(dim)
        self.cross_attention, self.cross_mlp = Attention(dim, heads), MLP(dim)

    def forward(
        self,
        desc0: torch.Tensor,
        desc1: torch.Tensor,
        encoding0: torch.Tensor,
        encoding1: torch.Tensor,
        mask0: torch.Tensor | None,
        mask1: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        desc0 = desc0 + self.self_mlp(
            torch.cat([desc0, self.self_attention(desc0, desc0, mask0, encoding0)], -1)
        )
        desc1 = desc1 + self.self_mlp(
            torch.cat([desc1, self.self_attention(desc1, desc1, mask1, encoding1)], -1)
        )
        message0 = self.cross_attention(desc0, desc1, mask1, None)
        message1 = self.cross_attention(desc1, desc0, mask0, None)
        return (
            desc0 + self.cross_mlp(torch.cat([desc0, message0], -1)),
            desc1 + self.cross_mlp(torch.cat([desc1, message1], -1)),
        )


class MatchAssignment(nn.Module):
    """Log assignment (B, M, N) of a layer's descriptors: double softmax of the similarity plus
    both keypoints' log matchability (the dustbins play no part in choosing matches)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.final_projection = nn.Linear(dim, dim)
        self.matchability = nn.Linear(dim, 1)

    def forward(
        self, desc0: torch.Tensor, desc1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor
    ) -> torch.Tensor:
        scale = desc0.shape[-1] ** 0.25
        similarity = (
            self.final_projection(desc0) / scale @ (self.final_projection(desc1) / scale).transpose(1, 2)
        )
        pair_mask = mask0[:, :, None] & mask1[:, None, :]
        similarity = similarity.masked_fill(~pair_mask, torch.finfo(similarity.dtype).min)
        certainty = F.logsigmoid(self.matchability(desc0)) + F.logsigmoid(self.matchability(desc1)).transpose(
            1, 2
        )
        return similarity.log_softmax(2) + similarity.log_softmax(1) + certainty

    def matchable(self, desc: torch.Tensor) -> torch.Tensor:
        """Probability (B, N) that each keypoint has a match."""
        return torch.sigmoid(self.matchability(desc)).squeeze(-1)


class TokenConfidence(nn.Module):
    """Confidence (B, N) that a keypoint's final assignment is already decided."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Linear(dim, 1)

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.token(desc)).squeeze(-1)


def _compact(
    keep: torch.Tensor, tensors: list[torch.Tensor], dims: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The kept entries (``keep`` (B, N)) of each tensor along its dim ``dims[i]``, moved to the
    front in their order and padded to the longest row; returns them and the new mask."""
    counts = keep.sum(1)
    length = int(counts.max())
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :length]
    out = []
    for tensor, dim in zip(tensors, dims):
        shape = [1] * tensor.dim()
        shape[0], shape[dim] = order.shape
        index = order.view(shape).expand(*tensor.shape[:dim], length, *tensor.shape[dim + 1 :])
        out.append(tensor.gather(dim, index))
    return out, torch.arange(length, device=keep.device)[None] < counts[:, None]


@dataclass
class _Pairs:
    """The pairs of a batch still being matched: their ``rows`` in the batch, keypoint counts
    before pruning, and per image (lists of two) descriptors, positional encodings, masks,
    attention masks (None: no padding) and each keypoint's index in the input."""

    rows: torch.Tensor
    total: torch.Tensor
    desc: list[torch.Tensor]
    enc: list[torch.Tensor]
    mask: list[torch.Tensor]
    attention_mask: list[torch.Tensor | None]
    index: list[torch.Tensor]

    def select(self, which: torch.Tensor) -> _Pairs:
        """The pairs ``which`` (B,) bool selects."""

        def pick(tensors: list) -> list:
            return [None if t is None else t[which] for t in tensors]

        return _Pairs(
            self.rows[which], self.total[which], pick(self.desc), pick(self.enc), pick(self.mask),
            pick(self.attention_mask), pick(self.index),
        )  # fmt: skip


class LightGlue(nn.Module):
    """LightGlue for 256-d SuperPoint descriptors."""

    def __init__(
        self,
        depth_confidence: float = DEFAULTS["depth_confidence"],
        width_confidence: float = DEFAULTS["width_confidence"],
        filter_threshold: float = DEFAULTS["filter_threshold"],
        dim: int = 256,
        heads: int = 4,
        layers: int = 9,
    ) -> None:
        super().__init__()
        self.depth_confidence = depth_confidence
        self.width_confidence = width_confidence
        self.filter_threshold = filter_threshold
        self.positional_encoder = PositionalEncoder(dim // heads)
        self.transformer_layers = nn.ModuleList(TransformerLayer(dim, heads) for _ in range(layers))
        self.match_assignment_layers = nn.ModuleList(MatchAssignment(dim) for _ in range(layers))
        self.token_confidence = nn.ModuleList(TokenConfidence(dim) for _ in range(layers - 1))

    def confidence_threshold(self, layer: int) -> float:
        """Token confidence above which a keypoint counts as decided after ``layer``."""
        return min(max(0.8 + 0.1 * math.exp(-4.0 * layer / len(self.transformer_layers)), 0.0), 1.0)

    def _confidence(self, layer: int, pairs: _Pairs) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """Token confidences after ``layer`` (None with adaptive depth off) and which pairs stop
        there: all after the last layer, else those whose keypoints (pruned ones counting as
        confident) are confident in a share above ``depth_confidence``."""
        stop = torch.ones_like(pairs.rows, dtype=torch.bool)
        if layer == len(self.transformer_layers) - 1:
            return None, stop
        if self.depth_confidence <= 0:
            return None, ~stop
        tokens = [self.token_confidence[layer](d) for d in pairs.desc]
        threshold = self.confidence_threshold(layer)
        unsure = sum(((t < threshold) & m).sum(1) for t, m in zip(tokens, pairs.mask))
        return tokens, 1.0 - unsure / pairs.total > self.depth_confidence

    def _assign(self, layer: int, pairs: _Pairs, matches: torch.Tensor, scores: torch.Tensor) -> None:
        """Match ``pairs`` with ``layer``'s assignment head into their rows of ``matches`` and
        ``scores`` (by input keypoint index; padding goes to their last, spare column)."""
        (desc0, desc1), (mask0, mask1), (index0, index1) = pairs.desc, pairs.mask, pairs.index
        assignment = self.match_assignment_layers[layer](desc0, desc1, mask0, mask1)
        found, probability = mutual_matches(assignment, mask0, mask1, self.filter_threshold)
        columns = torch.where(mask0, index0, matches.shape[1] - 1)
        matches[pairs.rows[:, None], columns] = torch.where(
            found >= 0, index1.gather(1, found.clamp(min=0)), -1
        )
        scores[pairs.rows[:, None], columns] = probability

    def _prune(self, layer: int, pairs: _Pairs, tokens: list[torch.Tensor] | None) -> _Pairs:
        """Drop the keypoints confidently unmatchable after ``layer`` (keypoints not yet decided
        stay), and the pairs left with an image without keypoints (they have no matches)."""
        for side in (0, 1):
            keep = self.match_assignment_layers[layer].matchable(pairs.desc[side]) > 1 - self.width_confidence
            if tokens is not None:
                keep |= tokens[side] <= self.confidence_threshold(layer)
            (pairs.desc[side], pairs.enc[side], pairs.index[side]), pairs.mask[side] = _compact(
                keep & pairs.mask[side], [pairs.desc[side], pairs.enc[side], pairs.index[side]], [1, 2, 1]
            )
            pairs.attention_mask[side] = pairs.mask[side]
        going = pairs.mask[0].any(1) & pairs.mask[1].any(1)
        return pairs if bool(going.all()) else pairs.select(going)

    def forward(self, image0: PaddedFeatures, image1: PaddedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Matches (B, M) of image 0's keypoints into image 1 (-1: none) and their scores."""
        batch, length0 = image0.mask.shape
        device = image0.mask.device
        matches = torch.full((batch, length0 + 1), -1, dtype=torch.long, device=device)
        scores = torch.zeros((batch, length0 + 1), device=device)
        images = (image0, image1)
        pairs = _Pairs(
            torch.arange(batch, device=device),
            image0.mask.sum(1) + image1.mask.sum(1),
            [i.descriptors for i in images],
            [self.positional_encoder(normalize_keypoints(i.keypoints, i.image_size)) for i in images],
            [i.mask for i in images],
            [i.attention_mask for i in images],
            [torch.arange(i.mask.shape[1], device=device).expand(batch, -1) for i in images],
        )
        for layer, transformer in enumerate(self.transformer_layers):
            pairs.desc = list(transformer(*pairs.desc, *pairs.enc, *pairs.attention_mask))
            tokens, stop = self._confidence(layer, pairs)
            if bool(stop.any()):
                self._assign(layer, pairs.select(stop), matches, scores)
                if bool(stop.all()):
                    break
                pairs = pairs.select(~stop)
                tokens = None if tokens is None else [t[~stop] for t in tokens]
            if self.width_confidence > 0:
                pairs = self._prune(layer, pairs, tokens)
                if not len(pairs.rows):
                    break
        return matches[:, :length0], scores[:, :length0]
