"""Stage 4, network: the SuperPoint convolutional network, dense outputs only.

A shared VGG-style encoder (8 convolutions, 3 max-pools, stride 8) feeds a detector head
(65-way softmax per 8x8 cell, dustbin dropped, depth-to-space to full resolution) and a
descriptor head (256-d, L2-normalised per cell). Keypoint selection lives in ``postprocess``.

Layer names follow Magic Leap's release (``conv1a`` ... ``convDb``). ``batch_norm=True`` builds
Rémi Pautrat's re-training ("v6"), which puts a BatchNorm after each ReLU and after the two
final 1x1 convolutions (``bn1a`` ... ``bnDb``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 8
DESCRIPTOR_DIM = 256
_ENCODER = [
    ("1a", 1, 64),
    ("1b", 64, 64),
    ("2a", 64, 64),
    ("2b", 64, 64),
    ("3a", 64, 128),
    ("3b", 128, 128),
    ("4a", 128, 128),
    ("4b", 128, 128),
]
_HEADS = [
    ("Pa", 128, 256, 3),
    ("Pb", 256, STRIDE * STRIDE + 1, 1),
    ("Da", 128, 256, 3),
    ("Db", 256, DESCRIPTOR_DIM, 1),
]
LAYER_NAMES = [name for name, *_ in _ENCODER] + [name for name, *_ in _HEADS]


class SuperPoint(nn.Module):
    """SuperPoint (DeTone, Malisiewicz, Rabinovich 2018), returning dense maps.

    ``forward(image)`` takes a (B, 1, H, W) float tensor in [0, 1] and returns
    ``(scores, descriptors)``: per-pixel keypoint probabilities of shape (B, 8*(H//8), 8*(W//8))
    and unit-norm descriptors of shape (B, 256, H//8, W//8).
    """

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        for name, c_in, c_out in _ENCODER:
            self._add_layer(name, c_in, c_out, 3)
        for name, c_in, c_out, kernel in _HEADS:
            self._add_layer(name, c_in, c_out, kernel)

    def _add_layer(self, name: str, c_in: int, c_out: int, kernel: int) -> None:
        self.add_module(f"conv{name}", nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2))
        if self.batch_norm:
            self.add_module(f"bn{name}", nn.BatchNorm2d(c_out, eps=1e-3))

    def _layer(self, name: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        x = getattr(self, f"conv{name}")(x)
        if relu:
            x = F.relu(x)
        if self.batch_norm:
            x = getattr(self, f"bn{name}")(x)
        return x

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Shared encoder: (B, 1, H, W) -> (B, 128, H//8, W//8)."""
        x = image
        for index, (name, *_rest) in enumerate(_ENCODER):
            x = self._layer(name, x)
            if index in (1, 3, 5):
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(image)
        logits = self._layer("Pb", self._layer("Pa", features), relu=False)
        probabilities = F.softmax(logits, dim=1)[:, :-1]
        scores = F.pixel_shuffle(probabilities, STRIDE)[:, 0]
        descriptors = self._layer("Db", self._layer("Da", features), relu=False)
        return scores, F.normalize(descriptors, p=2, dim=1)
