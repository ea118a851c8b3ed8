"""A checkpoint turned into a model that takes raw images: what `hpo export` and the MLflow model hold.

The training loop feeds normalised tensors; a served model should accept the images a user has, so the
training split's per-channel mean and std are folded into the model as its first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
                 class_names: Sequence[str] = (), input_info: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.input_info = dict(input_info or {})  # what the images must be: the exported model's metadata
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
        "pixels": pixel_scale(data.name, data.train_x.dtype),
    }


def pixel_scale(dataset: str, stored: torch.dtype | None = None) -> str:
    """The pixel values the model was trained on, and so must be given: a model fed 0..1 where it learnt
    0..255 predicts one class for everything, silently. ``stored`` None: a checkpoint that did not record it."""
    if dataset == "digits":
        return "0..16"
    if stored == torch.uint8 or (stored is None and dataset not in ("arrays", "synthetic")):
        return "0..255 (not 0..1)"
    return "the scale of x_train in the data file" if dataset == "arrays" else "the training data's own scale"


def input_info(dataset: str, pixels: str, example: Tensor) -> dict[str, str]:
    """The exported model's input, in words (its metadata and `hpo export`'s output): shape, dtype and pixel
    scale, and for an image-folder study how a picture file becomes that input, as the training images did."""
    channels, size = example.shape[1], example.shape[-1]
    shape = f"(N, {channels}, {size}, {size})"
    info = {"input": f"float32 images {shape}, pixel values {pixels}; normalised inside the model"}
    if dataset == "folder":
        mode = "RGB" if channels == 3 else "L (grayscale)"
        info["image_files"] = (f"as in training: open with Pillow, apply the EXIF orientation, convert to {mode}, "
                               f"resize the shorter side to {size} (bilinear), center-crop {size}x{size}, "
                               "then HWC -> CHW as float32 (README: Export)")
    return info


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
    example = record["example"].float().contiguous()
    dataset = str(checkpoint["settings"].get("dataset", ""))
    info = input_info(dataset, record.get("pixels") or pixel_scale(dataset), example)
    model = Classifier(net, record["mean"], record["std"], [str(n) for n in record["class_names"]], info).eval()
    return model, example
