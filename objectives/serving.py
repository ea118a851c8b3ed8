"""A checkpoint turned into a model that takes raw images: what `hpo export` and the MLflow model hold.

The training loop feeds normalised tensors; a served model should accept the images a user has, so the
training split's per-channel mean and std are folded into the model as its first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from objectives.data import DataSplits, load_data
from objectives.networks import build_network
from objectives.settings import TrainConfig
from search.checkpoint import load_checkpoint

EXAMPLE_IMAGES = 5


class Classifier(nn.Module):
    """Raw images (float32, NCHW, the data set's own pixel scale) -> class indices (int64); `class_names[i]`
    names class i (the exported model's metadata holds them too)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 class_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def logits(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(dim=1)


def data_record(data: DataSplits) -> dict[str, Any]:
    """What a checkpoint keeps of its data so it can be served without it: class names, the normalisation,
    and a few raw test images as an input example (plain lists and one small tensor: weights_only-safe)."""
    return {
        "class_names": list(data.class_names),
        "mean": list(data.mean),
        "std": list(data.std),
        "example": data.test_x[:EXAMPLE_IMAGES].cpu().float().clone(),
    }


def load_classifier(checkpoint_path: str) -> tuple[Classifier, Tensor]:
    """(model on the CPU in eval mode, a few raw test images as an input example).

    Checkpoints written before `data` was recorded read the data set again for its statistics."""
    checkpoint = load_checkpoint(checkpoint_path)
    record = checkpoint.get("data")
    if record is None:
        cfg = TrainConfig.model_validate(checkpoint["settings"])
        record = data_record(load_data(cfg, torch.device("cpu")))
    net = build_network(checkpoint["model_spec"], pretrained=False)
    net.load_state_dict(checkpoint["state_dict"])
    model = Classifier(net, record["mean"], record["std"], [str(n) for n in record["class_names"]]).eval()
    return model, record["example"].float().contiguous()
