"""The CNN being tuned, built from a plain-dict spec so a checkpoint can rebuild it with weights_only=True."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
SPEC_KEYS = ("in_channels", "num_classes", "widths", "blocks_per_stage", "activation", "dropout", "image_size")
OPTIONAL_KEYS = ("pool_first",)  # absent from the specs of earlier versions and of the default order


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A CNN from exactly the `SPEC_KEYS` of a spec (`objectives.networks.network_spec` makes the whole spec and
    `build_network` picks them; checkpoints of earlier versions hold only these); missing or unknown keys are
    an error, not a silent default."""
    missing, unknown = set(SPEC_KEYS) - set(spec), set(spec) - set(SPEC_KEYS) - set(OPTIONAL_KEYS)
    if missing or unknown:
        raise ValueError(f"bad model spec: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if spec["activation"] not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {spec['activation']!r}; expected one of {sorted(_ACTIVATIONS)}")
    return CNN(**spec)


def conv_block(in_channels: int, out_channels: int, activation: str, pool: bool = False) -> nn.Sequential:
    """conv3x3 (no bias: BatchNorm's shift replaces it) -> [2x2 max-pool] -> BatchNorm -> activation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        *([nn.MaxPool2d(2)] if pool else []),
        nn.BatchNorm2d(out_channels),
        _ACTIVATIONS[activation](),
    )


def dropout_with(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout whose mask comes from `generator` (the global generator when None): a trial's masks
    then depend on its own seed only, so it draws the same masks trained alone or packed with others."""
    if p == 0.0:
        return x
    if generator is None:
        return F.dropout(x, p, training=True)
    return x * dropout_keep(x.shape, p, generator, x.device).to(x.dtype) / (1.0 - p)


def dropout_keep(shape: torch.Size, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """The 0/1 float mask `dropout_with` draws from `generator` for a tensor of `shape` (all ones for p = 0,
    drawing nothing), on `device`: a pack draws each member's mask with it, then applies them all at once."""
    if p == 0.0:
        return torch.ones(shape, device=device)
    return torch.empty(shape, device=generator.device).bernoulli_(1.0 - p, generator=generator).to(device)


class GeneratorDropout(nn.Dropout):
    """`nn.Dropout` (same state_dict: none) that draws its masks from `generator` once training sets one."""

    generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        return dropout_with(x, self.p, self.generator) if self.training else x


def use_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Make every `GeneratorDropout` in `model` draw from `generator` (the training loop's own)."""
    for module in model.modules():
        if isinstance(module, GeneratorDropout):
            module.generator = generator


class CNN(nn.Module):
    """Stages of conv blocks, each followed by a 2x2 max-pool unless that would shrink the map below 2x2;
    then global average pooling, dropout and a linear classifier.

    `pool_first`: the pool moves inside each stage's first block, right after its convolution (conv, pool,
    BatchNorm, activation: the order of Keller Jordan's cifar10-airbench), so the stage's BatchNorm, activations
    and later convolutions run on a quarter of the pixels: about half the GPU time of the CIFAR-shaped CNN
    (BENCHMARKS.md section 9)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: list[int],
        blocks_per_stage: int,
        activation: str,
        dropout: float,
        image_size: int,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in widths:
            pool = size // 2 >= 2
            for block in range(blocks_per_stage):
                layers.append(conv_block(channels, width, activation, pool=pool_first and pool and block == 0))
                channels = width
            if pool:
                if not pool_first:
                    layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = GeneratorDropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))
