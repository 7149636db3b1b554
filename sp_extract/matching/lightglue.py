"""LightGlue (Lindenberger et al., ICCV 2023) for stored SuperPoint features, for batches of
padded pairs: rotary keypoint encoding, 9 self + cross attention layers, double-softmax
assignment, with adaptive depth (a pair stops once its keypoints are confident) and width
(unmatchable keypoints are pruned).

Each image's keypoints are normalised by its own size. Every pair of a batch stops and prunes on
its own, so it gets what it gets alone. Parameter names are those of transformers'
``LightGlueForKeypointMatching`` (``learned_weights`` converts cvg/LightGlue's layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .learned import PaddedFeatures, mutual_matches


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


class LightGlue(nn.Module):
    """LightGlue for 256-d SuperPoint descriptors."""

    def __init__(
        self,
        depth_confidence: float = 0.95,
        width_confidence: float = 0.99,
        filter_threshold: float = 0.1,
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

    def forward(self, image0: PaddedFeatures, image1: PaddedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Matches (B, M) of image 0's keypoints into image 1 (-1: none) and their scores."""
        batch, length0 = image0.mask.shape
        device = image0.mask.device
        trash = length0  # a column for the padding of pruned pairs, cut off at the end
        matches = torch.full((batch, length0 + 1), -1, dtype=torch.long, device=device)
        scores = torch.zeros((batch, length0 + 1), device=device)
        pairs = torch.arange(batch, device=device)
        total = image0.mask.sum(1) + image1.mask.sum(1)
        desc = [image0.descriptors, image1.descriptors]
        enc = [
            self.positional_encoder(normalize_keypoints(i.keypoints, i.image_size)) for i in (image0, image1)
        ]
        mask = [image0.mask, image1.mask]
        attention_mask = [image0.attention_mask, image1.attention_mask]
        index = [torch.arange(i.mask.shape[1], device=device).expand(batch, -1) for i in (image0, image1)]
        last = len(self.transformer_layers) - 1
        for layer, transformer in enumerate(self.transformer_layers):
            desc = list(transformer(*desc, *enc, *attention_mask))
            tokens = None
            stop = torch.ones_like(pairs, dtype=torch.bool)
            if layer < last:
                stop = torch.zeros_like(stop)
                if self.depth_confidence > 0:
                    tokens = [self.token_confidence[layer](d) for d in desc]
                    threshold = self.confidence_threshold(layer)
                    unsure = sum(((t < threshold) & m).sum(1) for t, m in zip(tokens, mask))
                    stop = 1.0 - unsure / total > self.depth_confidence
            if bool(stop.any()):
                rows = pairs[stop]
                assignment = self.match_assignment_layers[layer](
                    desc[0][stop], desc[1][stop], mask[0][stop], mask[1][stop]
                )
                found, probability = mutual_matches(
                    assignment, mask[0][stop], mask[1][stop], self.filter_threshold
                )
                columns = torch.where(mask[0][stop], index[0][stop], trash)
                matches[rows[:, None], columns] = torch.where(
                    found >= 0, index[1][stop].gather(1, found.clamp(min=0)), -1
                )
                scores[rows[:, None], columns] = probability
                going = ~stop
                if not bool(going.any()):
                    break
                pairs, total = pairs[going], total[going]
                desc, enc, mask, index = ([t[going] for t in ts] for ts in (desc, enc, mask, index))
                attention_mask = [None if m is None else m[going] for m in attention_mask]
                tokens = None if tokens is None else [t[going] for t in tokens]
            if layer < last and self.width_confidence > 0:
                for side in (0, 1):
                    keep = (
                        self.match_assignment_layers[layer].matchable(desc[side]) > 1 - self.width_confidence
                    )
                    if tokens is not None:  # keypoints not yet decided are kept
                        keep |= tokens[side] <= self.confidence_threshold(layer)
                    (desc[side], enc[side], index[side]), mask[side] = _compact(
                        keep & mask[side], [desc[side], enc[side], index[side]], [1, 2, 1]
                    )
                    attention_mask[side] = mask[side]
                going = mask[0].any(1) & mask[1].any(1)  # a pair with an image pruned empty has no matches
                if not bool(going.all()):
                    pairs, total = pairs[going], total[going]
                    desc, enc, mask, index, attention_mask = (
                        [t[going] for t in ts] for ts in (desc, enc, mask, index, attention_mask)
                    )
                    if not len(pairs):
                        break
        return matches[:, :length0], scores[:, :length0]
