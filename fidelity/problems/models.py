"""The model architectures of the built-in problems."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def linear_model(in_features: int, out_features: int) -> nn.Module:
    """A linear map with bias; the model of logistic and ridge regression."""
    return nn.Linear(in_features, out_features)


def tanh_mlp(sizes: tuple[int, ...]) -> nn.Module:
    """Linear layers of the given widths with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for position, (width_in, width_out) in enumerate(itertools.pairwise(sizes)):
        if position:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """1x8x8 digits: conv 3x3 (8 channels) + tanh, conv 3x3 stride 2 (8) + tanh, linear to 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv1(x.reshape(-1, 1, 8, 8)))
        hidden = torch.tanh(self.conv2(hidden))
        return self.head(hidden.flatten(1))
