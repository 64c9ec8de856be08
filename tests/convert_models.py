"""Unmodified plain torch models, as users write them, for the conversion tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sequential_cnn(classes: int = 2) -> nn.Sequential:
    """conv/BN/ReLU/flatten/linear in one nn.Sequential (8x8 digits as 1x8x8 images)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes),
    )


class Block(nn.Module):
    """A basic residual block: functional relu and ``x + y`` in forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


class SmallResNet(nn.Module):
    """Stem, two residual stages, global pooling, Linear -> LayerNorm, one plain head per task."""

    def __init__(self, num_tasks: int, classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = Block(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(32)
        self.block2 = Block(32)
        self.fc = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.heads = nn.ModuleList(nn.Linear(64, classes) for _ in range(num_tasks))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block1(x)
        x = F.relu(self.down_bn(self.down(x)))
        x = self.block2(x)
        x = x.mean((2, 3))
        return F.relu(self.norm(self.fc(x)))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.features(x))
