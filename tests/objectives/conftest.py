"""Writers for tiny data sets in the exact on-disk formats torchvision reads (no network needed)."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """Run torch single-threaded here: these tiny models gain nothing from a second thread, and on a
    2-core machine shared with other jobs, intra-op threads waiting on each other made the suite 3x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The big-endian idx format of the MNIST files: magic (0, 0, uint8 code 8, ndim), dims, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def make_mnist() -> Callable[..., dict[str, np.ndarray]]:
    """Write `root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`; return what was written."""

    def make(root: Path, folder: str = "MNIST", n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        arrays = {
            "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
            "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
        }
        raw = root / folder / "raw"
        _write_idx(raw / "train-images-idx3-ubyte", arrays["train_x"])
        _write_idx(raw / "train-labels-idx1-ubyte", arrays["train_y"])
        _write_idx(raw / "t10k-images-idx3-ubyte", arrays["test_x"])
        _write_idx(raw / "t10k-labels-idx1-ubyte", arrays["test_y"])
        return arrays

    return make


@pytest.fixture
def make_cifar() -> Callable[..., dict[str, np.ndarray]]:
    """Write CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`) pickles as the
    official archives hold them: rows of 3072 uint8 in planar R, G, B order."""

    def make(root: Path, classes: int = 10, per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(1)
        n_train = per_batch * 5 if classes == 10 else per_batch
        arrays = {
            "train_x": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
            "train_y": rng.integers(0, classes, n_train),
            "test_x": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            "test_y": rng.integers(0, classes, n_test),
        }
        names = [f"class_{i}" for i in range(classes)]
        if classes == 10:
            base = root / "cifar-10-batches-py"
            for b in range(5):
                rows = slice(b * per_batch, (b + 1) * per_batch)
                batch = {"data": arrays["train_x"][rows], "labels": arrays["train_y"][rows].tolist()}
                _write_pickle(base / f"data_batch_{b + 1}", batch)
            _write_pickle(base / "test_batch", {"data": arrays["test_x"], "labels": arrays["test_y"].tolist()})
            _write_pickle(base / "batches.meta", {"label_names": names})
        else:
            base = root / "cifar-100-python"
            for split in ("train", "test"):
                labels = arrays[f"{split}_y"].tolist()
                entry = {"data": arrays[f"{split}_x"], "fine_labels": labels, "coarse_labels": labels}
                _write_pickle(base / split, entry)
            _write_pickle(base / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
        return arrays

    return make
