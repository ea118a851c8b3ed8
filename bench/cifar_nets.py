"""CIFAR-shaped CNN variants for bench/cifar_epoch_variants.py, as user model factories (`model = "<this
file>:build"`), so they train through the same `fit` as the shipped CNN.

`pool_first` moves each stage's 2x2 max-pool from after its last conv to right after its first conv (the order
of Keller Jordan's cifar10-airbench: conv, pool, BatchNorm, activation): every later conv of the stage, and the
BatchNorm and activation passes, run on a quarter of the pixels. The question it answers: how much of the
CIFAR-shaped epoch is full-resolution BatchNorm/ReLU memory traffic.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


class PoolFirstCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float, widths: list[int], blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [_conv(channels, width), nn.MaxPool2d(2), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            for _ in range(blocks - 1):
                layers += [_conv(width, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build(num_classes: int, in_channels: int, dropout: float, widths: list[int] | None = None,
          blocks: int = 2) -> nn.Module:
    return PoolFirstCNN(in_channels, num_classes, dropout, list(widths or [64, 128, 256]), blocks)
