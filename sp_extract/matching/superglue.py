"""SuperGlue (Sarlin et al., CVPR 2020): attentional graph neural network and optimal transport
matching stored SuperPoint features, for batches of padded pairs.

Each image's keypoints are normalised by its own size (as Magic Leap's implementation does). The
Sinkhorn iterations run on each pair's own keypoint counts, padding carrying no mass, so a pair
matched in a padded batch gets what it gets alone. Parameter names are those of transformers'
``SuperGlueForKeypointMatching`` with shorter prefixes (``weights`` converts both
published layouts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEARNED_OPTIONS
from .learned import PaddedFeatures, mutual_matches

DEFAULTS = LEARNED_OPTIONS["superglue"]


class LinearBatchNormReLU(nn.Module):
    """Linear layer, BatchNorm over channels, ReLU (a 1x1 convolution block of the original)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)
        self.batch_norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.batch_norm(self.linear(x).transpose(1, 2)).transpose(1, 2))


def perceptron(channels: list[int]) -> nn.Sequential:
    """Blocks of ``LinearBatchNormReLU`` between ``channels``, a plain linear layer last."""
    blocks: list[nn.Module] = [LinearBatchNormReLU(a, b) for a, b in zip(channels[:-2], channels[1:-1])]
    return nn.Sequential(*blocks, nn.Linear(channels[-2], channels[-1]))


def normalize_keypoints(keypoints: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """Pixels (B, N, 2) to SuperGlue's frame: centred, divided by 0.7 x the image's longer side."""
    size = image_size.to(keypoints)
    return (keypoints - size[:, None] / 2) / (0.7 * size.amax(1)[:, None, None])


class Attention(nn.Module):
    """Multi-head attention of ``x`` on ``source``; padded keys (``mask`` False) are ignored."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.merge = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(source)), split(self.value(source))
        attn_mask = None if mask is None else mask[:, None, None, :]
        message = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.merge(message.transpose(1, 2).flatten(2))


class Propagation(nn.Module):
    """One message-passing layer: attention, then an MLP on [descriptor, message]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = Attention(dim, heads)
        self.mlp = perceptron([2 * dim, 2 * dim, dim])

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(torch.cat([x, self.attention(x, source, mask)], -1))


def log_optimal_transport(
    scores: torch.Tensor, bin_score: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Log-space Sinkhorn on ``scores`` (B, M, N) with a dustbin row and column of ``bin_score``.

    Each pair uses its own counts m, n (``mask0``, ``mask1``): rows carry mass 1 / (m + n), the
    dustbins n / (m + n) and m / (m + n), padding none. Returns the log assignment (B, M + 1, N + 1)
    times m + n; padded entries are -inf.
    """
    batch, rows, columns = scores.shape
    m, n = mask0.sum(1).to(scores), mask1.sum(1).to(scores)
    norm = -(m + n).log()
    inf = scores.new_tensor(float("-inf"))
    bins0, bins1 = bin_score.expand(batch, rows, 1), bin_score.expand(batch, 1, columns + 1)
    couplings = torch.cat([torch.cat([scores, bins0], 2), bins1], 1)
    couplings[:, :rows, :columns].masked_fill_(~(mask0[:, :, None] & mask1[:, None, :]), inf)
    log_mu = torch.cat([torch.where(mask0, norm[:, None], inf), (n.log() + norm)[:, None]], 1)
    log_nu = torch.cat([torch.where(mask1, norm[:, None], inf), (m.log() + norm)[:, None]], 1)
    # padding starts (and stays) at -inf: no mass, also not in the dustbins' first update
    u, v = (torch.zeros_like(log).masked_fill(log.isneginf(), float("-inf")) for log in (log_mu, log_nu))
    for _ in range(iterations):
        u = log_mu - torch.logsumexp(couplings + v[:, None, :], 2)
        v = log_nu - torch.logsumexp(couplings + u[:, :, None], 1)
    return couplings + u[:, :, None] + v[:, None, :] - norm[:, None, None]


class SuperGlue(nn.Module):
    """SuperGlue for 256-d SuperPoint descriptors: keypoint encoder, 9 self + cross layers,
    final projection, Sinkhorn with a learnt dustbin score."""

    def __init__(
        self,
        sinkhorn_iterations: int = DEFAULTS["sinkhorn_iterations"],
        match_threshold: float = DEFAULTS["match_threshold"],
        dim: int = 256,
        heads: int = 4,
        layers: int = 18,
    ) -> None:
        super().__init__()
        self.sinkhorn_iterations = sinkhorn_iterations
        self.match_threshold = match_threshold
        self.keypoint_encoder = perceptron([3, 32, 64, 128, 256, dim])
        self.layers = nn.ModuleList(Propagation(dim, heads) for _ in range(layers))
        self.final_proj = nn.Linear(dim, dim)
        self.bin_score = nn.Parameter(torch.tensor(1.0))

    def forward(self, image0: PaddedFeatures, image1: PaddedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Matches (B, M) of image 0's keypoints into image 1 (-1: none) and their scores."""
        descriptors = []
        for image in (image0, image1):
            inputs = torch.cat(
                [normalize_keypoints(image.keypoints, image.image_size), image.scores[..., None]], -1
            )
            descriptors.append(image.descriptors + self.keypoint_encoder(inputs))
        desc0, desc1 = descriptors
        masks = image0.attention_mask, image1.attention_mask
        for index, layer in enumerate(self.layers):
            cross = index % 2  # self, cross, self, cross ...
            source0, source1 = (desc1, desc0) if cross else (desc0, desc1)
            delta0 = layer(desc0, source0, masks[cross])
            delta1 = layer(desc1, source1, masks[1 - cross])
            desc0, desc1 = desc0 + delta0, desc1 + delta1
        desc0, desc1 = self.final_proj(desc0), self.final_proj(desc1)
        scores = desc0 @ desc1.transpose(1, 2) / desc0.shape[-1] ** 0.5
        log_assignment = log_optimal_transport(
            scores, self.bin_score, image0.mask, image1.mask, self.sinkhorn_iterations
        )
        return mutual_matches(log_assignment[:, :-1, :-1], image0.mask, image1.mask, self.match_threshold)
