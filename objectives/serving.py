"""A checkpoint turned into a model that takes raw images: what `hpo export` and the MLflow model hold.

The training loop feeds normalised tensors; a served model should accept the images a user has, so the
training split's per-channel mean and std are folded into the model as its first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from objectives.data import load_data
from objectives.model import build_model
from objectives.settings import TrainConfig
from search.checkpoint import load_checkpoint

EXAMPLE_IMAGES = 5


class Classifier(nn.Module):
    """Raw images (float32, NCHW, the data set's own pixel scale) -> class logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def load_classifier(checkpoint_path: str) -> tuple[nn.Module, Tensor]:
    """(model on the CPU in eval mode, a few raw test images as an input example) from a checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path)
    cfg = TrainConfig.model_validate(checkpoint["settings"])
    data = load_data(cfg, torch.device("cpu"))
    net = build_model(checkpoint["model_spec"])
    net.load_state_dict(checkpoint["state_dict"])
    model = Classifier(net, data.mean, data.std).eval()
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    example = (data.test_x[:EXAMPLE_IMAGES].cpu() * std + mean).float().contiguous()
    return model, example
