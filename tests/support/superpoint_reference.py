"""Plain reference SuperPoint for the correctness tests, written from the paper and reference code.

Independent of ``sp_extract``: the network is spelled out with ``torch.nn.functional`` calls in
Magic Leap's demo order (v1) or Rémi Pautrat's ``VGGBlock`` order conv -> ReLU -> BatchNorm (v6),
reading the state dicts in their own published key layouts; depth-to-space is the demo's reshape.
Post-processing is numpy: two-round max-pool NMS (SuperGlue / hloc / transformers ``simple_nms``),
border removal on keypoint positions, strict threshold, top-k by score, hand-written bilinear
descriptor sampling with the ``align_corners=True`` s/2-offset formula, then L2 normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CELL = 8
V1_ENCODER = ["1a", "1b", "2a", "2b", "3a", "3b", "4a", "4b"]


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride=1, padding=weight.shape[-1] // 2)


def _dense_heads(semi: torch.Tensor, desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """65-way softmax, dustbin dropped, the demo's reshape to full resolution; unit descriptors."""
    prob = F.softmax(semi, dim=1)[:, :-1]
    batch, _, hc, wc = prob.shape
    heat = prob.permute(0, 2, 3, 1).reshape(batch, hc, wc, CELL, CELL)
    heat = heat.permute(0, 1, 3, 2, 4).reshape(batch, hc * CELL, wc * CELL)
    norm = torch.norm(desc, p=2, dim=1, keepdim=True)
    return heat, desc / norm


def dense_v1(state: dict[str, torch.Tensor], image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magic Leap v1 network on (B, 1, H, W) images with ``conv1a.weight`` ... ``convDb.bias``."""

    def conv(x: torch.Tensor, name: str) -> torch.Tensor:
        return _conv(x, state[f"conv{name}.weight"], state[f"conv{name}.bias"])

    x = image
    for index, name in enumerate(V1_ENCODER):
        x = F.relu(conv(x, name))
        if index in (1, 3, 5):
            x = F.max_pool2d(x, kernel_size=2, stride=2)
    semi = conv(F.relu(conv(x, "Pa")), "Pb")
    desc = conv(F.relu(conv(x, "Da")), "Db")
    return _dense_heads(semi, desc)


def dense_v6(state: dict[str, torch.Tensor], image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rpautrat's v6 network (``backbone.B.L.conv`` / ``.bn``, ``detector.L``, ``descriptor.L``)."""

    def block(x: torch.Tensor, prefix: str, relu: bool = True) -> torch.Tensor:
        x = _conv(x, state[f"{prefix}.conv.weight"], state[f"{prefix}.conv.bias"])
        if relu:
            x = F.relu(x)
        return F.batch_norm(
            x,
            state[f"{prefix}.bn.running_mean"],
            state[f"{prefix}.bn.running_var"],
            state[f"{prefix}.bn.weight"],
            state[f"{prefix}.bn.bias"],
            training=False,
            eps=1e-3,
        )

    x = image
    for stage in range(4):
        x = block(block(x, f"backbone.{stage}.0"), f"backbone.{stage}.1")
        if stage < 3:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
    semi = block(block(x, "detector.0"), "detector.1", relu=False)
    desc = block(block(x, "descriptor.0"), "descriptor.1", relu=False)
    return _dense_heads(semi, desc)


def max_filter(values: np.ndarray, radius: int) -> np.ndarray:
    """Maximum over each (2r+1)^2 window; outside the map counts as -inf (max-pool padding)."""
    height, width = values.shape
    padded = np.full((height + 2 * radius, width + 2 * radius), -np.inf, dtype=np.float64)
    padded[radius : radius + height, radius : radius + width] = values
    result = np.full((height, width), -np.inf)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            result = np.maximum(result, padded[dy : dy + height, dx : dx + width])
    return result


def nms(scores: np.ndarray, radius: int) -> np.ndarray:
    """The reference's max-pool NMS: local maxima, then two rounds recovering unsuppressed maxima."""
    zeros = np.zeros_like(scores)
    is_max = scores == max_filter(scores, radius)
    for _ in range(2):
        suppressed = max_filter(is_max.astype(np.float64), radius) > 0
        remaining = np.where(suppressed, zeros, scores)
        is_max = is_max | ((remaining == max_filter(remaining, radius)) & ~suppressed)
    return np.where(is_max, scores, zeros)


def sample_bilinear(dense: np.ndarray, keypoints: np.ndarray, cell: int = CELL) -> np.ndarray:
    """Descriptors (N, C) at keypoints (N, 2; x, y in pixels) of a (C, h, w) map, L2-normalised.

    The s/2-offset formula with ``align_corners=True``: grid coordinate
    ``g = (x - s/2 + 0.5) / (w s - s/2 - 0.5) * 2 - 1``, i.e. map column ``(g + 1) / 2 * (w - 1)``;
    bilinear weights over the four neighbours, zero outside the map.
    """
    channels, height, width = dense.shape
    out = np.zeros((len(keypoints), channels))
    for n, (x, y) in enumerate(keypoints.astype(np.float64)):
        u = (x - cell / 2 + 0.5) / (width * cell - cell / 2 - 0.5) * (width - 1)
        v = (y - cell / 2 + 0.5) / (height * cell - cell / 2 - 0.5) * (height - 1)
        u0, v0 = int(np.floor(u)), int(np.floor(v))
        for row, wy in ((v0, 1 - (v - v0)), (v0 + 1, v - v0)):
            for col, wx in ((u0, 1 - (u - u0)), (u0 + 1, u - u0)):
                if 0 <= row < height and 0 <= col < width:
                    out[n] += wy * wx * dense[:, row, col]
    norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out / norms


@dataclass
class RefFeatures:
    keypoints: np.ndarray  # (N, 2) int, x, y
    scores: np.ndarray  # (N,)
    descriptors: np.ndarray  # (N, C)


def postprocess(
    scores: np.ndarray,
    dense: np.ndarray,
    threshold: float,
    nms_radius: int,
    border: int,
    max_keypoints: int,
) -> RefFeatures:
    """One image: (H, W) scores and a (C, H/8, W/8) descriptor map -> features."""
    height, width = scores.shape
    suppressed = nms(scores, nms_radius)
    ys, xs = np.nonzero(suppressed > threshold)
    keep = (ys >= border) & (ys < height - border) & (xs >= border) & (xs < width - border)
    ys, xs = ys[keep], xs[keep]
    values = suppressed[ys, xs]
    if 0 <= max_keypoints < len(values):
        order = np.argsort(-values, kind="stable")[:max_keypoints]
        ys, xs, values = ys[order], xs[order], values[order]
    keypoints = np.stack([xs, ys], axis=1).reshape(-1, 2)
    return RefFeatures(keypoints, values, sample_bilinear(dense, keypoints))


def to_original_hloc(
    keypoints: np.ndarray, working: tuple[int, int], original: tuple[int, int]
) -> np.ndarray:
    """hloc's mapping back to the original image: ``(k + 0.5) * scale - 0.5`` per axis."""
    scale = np.asarray(original, np.float64) / np.asarray(working, np.float64)
    return (keypoints.astype(np.float64) + 0.5) * scale - 0.5


def assert_same_features(ours, ref: RefFeatures, max_keypoints: int = -1) -> None:
    """Same keypoint set (ties at a top-k cut may pick either), scores 1e-5, descriptors 1e-4.

    ``ours`` has torch ``keypoints`` (N, 2), ``scores`` (N,) and ``descriptors`` (N, C).
    """
    keypoints = ours.keypoints.cpu().numpy()
    scores = ours.scores.cpu().numpy().astype(np.float64)
    descriptors = ours.descriptors.cpu().numpy().astype(np.float64)
    assert keypoints.shape == ref.keypoints.shape
    assert descriptors.shape == ref.descriptors.shape
    np.testing.assert_array_equal(keypoints, np.round(keypoints), err_msg="keypoints not on pixels")
    ours_by_xy = {tuple(int(v) for v in k): i for i, k in enumerate(keypoints)}
    assert len(ours_by_xy) == len(keypoints), "duplicate keypoints"
    ref_by_xy = {tuple(int(v) for v in k): i for i, k in enumerate(ref.keypoints)}
    common = sorted(set(ours_by_xy) & set(ref_by_xy))
    if 0 <= max_keypoints <= len(ref.scores) and set(ours_by_xy) != set(ref_by_xy):
        # a tie at the cut: the keypoints that differ must all carry the cut's score
        cut = ref.scores.min()
        differing = [scores[i] for k, i in ours_by_xy.items() if k not in ref_by_xy]
        differing += [ref.scores[i] for k, i in ref_by_xy.items() if k not in ours_by_xy]
        np.testing.assert_allclose(differing, cut, rtol=0, atol=1e-7)
    else:
        assert set(ours_by_xy) == set(ref_by_xy), (
            f"keypoints only ours: {sorted(set(ours_by_xy) - set(ref_by_xy))[:10]}, "
            f"only reference: {sorted(set(ref_by_xy) - set(ours_by_xy))[:10]}"
        )
    mine = [ours_by_xy[k] for k in common]
    theirs = [ref_by_xy[k] for k in common]
    np.testing.assert_allclose(scores[mine], ref.scores[theirs], rtol=0, atol=1e-5)
    np.testing.assert_allclose(descriptors[mine], ref.descriptors[theirs], rtol=0, atol=1e-4)


def random_v6_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in rpautrat's ``superpoint_pytorch.py`` layout (channels 64, 64, 128, 128, 256).

    ``backbone.S.L`` is a ``VGGBlock`` (``conv``, ``activation``, ``bn``) of stage S (max-pool
    after stages 0-2 holds no tensors); ``detector`` / ``descriptor`` are two blocks each, 3x3
    then 1x1 without ReLU.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    stages = [(1, 64), (64, 64), (64, 128), (128, 128)]
    for stage, (c_in, c_out) in enumerate(stages):
        layers[f"backbone.{stage}.0"] = (c_in, c_out, 3)
        layers[f"backbone.{stage}.1"] = (c_out, c_out, 3)
    layers.update({"detector.0": (128, 256, 3), "detector.1": (256, 65, 1)})
    layers.update({"descriptor.0": (128, 256, 3), "descriptor.1": (256, 256, 1)})
    state = {}
    for prefix, (c_in, c_out, kernel) in layers.items():
        fan_in = c_in * kernel * kernel
        state[f"{prefix}.conv.weight"] = (
            torch.randn(c_out, c_in, kernel, kernel, generator=generator) * (2 / fan_in) ** 0.5
        )
        state[f"{prefix}.conv.bias"] = torch.randn(c_out, generator=generator) * 0.1
        state[f"{prefix}.bn.weight"] = torch.rand(c_out, generator=generator) + 0.5
        state[f"{prefix}.bn.bias"] = torch.randn(c_out, generator=generator) * 0.1
        state[f"{prefix}.bn.running_mean"] = torch.randn(c_out, generator=generator) * 0.1
        state[f"{prefix}.bn.running_var"] = torch.rand(c_out, generator=generator) * 1.5 + 0.5
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
    return state
