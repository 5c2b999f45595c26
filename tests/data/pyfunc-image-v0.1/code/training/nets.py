"""The embedding networks of the class-based protocol: small strided CNNs, linear head.

Strided convolutions instead of pooling keep an epoch of Fashion-MNIST to seconds on
two CPU cores; `channels` sets the width (v1 narrow, v2/v3 wider).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvEmbedder(nn.Module):
    """(n, 1, 28, 28) images → (n, dim) features: three stride-2 convolutions (28→4),
    global average pooling and a linear head."""

    def __init__(self, channels: Sequence[int], dim: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c3, dim)
        self.channels, self.dim = list(channels), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
