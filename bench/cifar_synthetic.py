"""The CIFAR-shaped CNN the benches time: studies/cifar10.toml's objective on synthetic data of CIFAR-10's shape
(3x32x32, 10 classes), since neither this machine nor the GPU machine can download CIFAR-10. One place, so
"the CIFAR-shaped CNN" is the same network in every bench; each bench passes what it varies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from objectives.settings import TrainConfig  # noqa: E402
from search.config import load_settings  # noqa: E402

CIFAR_STUDY = REPO / "studies" / "cifar10.toml"


def cifar_synthetic(train: int, val: int, test: int, **update: Any) -> TrainConfig:
    """The study's objective settings on ``train``/``val``/``test`` synthetic images, with ``update`` applied
    (batch size, learning rate, device, compile, cuda_graphs, ...); validated like a study file's."""
    objective = load_settings(CIFAR_STUDY).objective.model_dump()
    data = {"dataset": "synthetic", "synthetic_shape": (3, 32, 32), "synthetic_classes": 10,
            "synthetic_train": train, "synthetic_val": val, "synthetic_test": test}
    return TrainConfig.model_validate({**objective, **data, **update})
