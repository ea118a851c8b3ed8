"""A user's own data: an image folder (see `image_folder.py`) or arrays in a .npz/.pt file, split and checked.

Both end as one `RawData`: every image in one NCHW tensor, each split as indices into it. Splits the data
does not bring are carved out of the training images, stratified by class and seeded by `data_seed`:
test first (`test_size`), then validation (`val_size`), as for digits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from objectives.data import RawData, _val_count, stratified_split
from objectives.errors import BadDataError, DatasetNotFoundError
from objectives.image_folder import decode_folder
from objectives.settings import TrainConfig

SPLITS = ("train", "val", "test")
FOLDER_IMAGE_SIZE = 64
FOLDER_CHANNELS = 3


def read_user_data(cfg: TrainConfig) -> RawData:
    if cfg.dataset == "folder":
        root = Path(cfg.data_dir)
        decoded = decode_folder(root, cfg.image_size or FOLDER_IMAGE_SIZE, cfg.channels or FOLDER_CHANNELS,
                                cfg.skip_bad_images, Path(cfg.cache_dir) if cfg.cache_dir else None)
        images = torch.from_numpy(decoded.images)
        labels = torch.from_numpy(decoded.labels)
        names, sources, where = decoded.class_names, decoded.sources, str(root)
        skipped, cache = decoded.skipped, decoded.cache
    else:
        images, labels, sources, names = read_arrays(Path(str(cfg.data_file)), cfg.channels, cfg.image_size)
        where, skipped, cache = str(cfg.data_file), (), None
    gap = ("after skipping unreadable ones; every class needs some. Add images or remove the class's folder"
           if cfg.dataset == "folder" else
           "in y_train: the classes are the label indices 0..K-1 (K = the length of 'classes', else the largest "
           "label + 1), so a label that is never used is a class without images. Number the labels 0..K-1 with "
           "no gaps, or add training images of these classes")
    index = assign_splits(labels, sources, len(names), cfg.val_size, cfg.test_size, cfg.data_seed, where, names, gap)
    return RawData(images, labels, index, len(names), tuple(names), flip_ok=images.shape[1] == 3,
                   skipped=skipped, cache=cache)


def assign_splits(labels: Tensor, sources: Sequence[str], num_classes: int, val_size: float | int,
                  test_size: float, seed: int, where: str, names: Sequence[str], gap: str) -> dict[str, Tensor]:
    """Indices of train/val/test: the data's own splits where it has them, the rest carved from train. ``gap``
    ends the error for a class without training images: why that happens with this kind of data, what to do."""
    source = np.asarray(sources)
    y = labels.numpy()
    given = {s: np.flatnonzero(source == s) for s in SPLITS}
    missing = [names[c] for c in range(num_classes) if not (y[given["train"]] == c).any()]
    if missing:
        raise BadDataError(
            f"{where}: class(es) {', '.join(map(repr, missing))} have no training images ({gap})."
        )

    def carve(pool: np.ndarray, size: float | int, what: str) -> tuple[np.ndarray, np.ndarray]:
        count = _val_count(size, len(pool)) if what == "validation" else max(1, round(size * len(pool)))
        if count >= len(pool):
            raise BadDataError(f"{where}: {what} size {size} leaves no training images out of {len(pool)}; "
                               "add images or lower it")
        return stratified_split(pool, y, count, seed)

    train = given["train"]
    test = given["test"]
    if not len(test):
        train, test = carve(train, test_size, "test")
    val = given["val"]
    if not len(val):
        train, val = carve(train, val_size, "validation")
    emptied = [c for c in range(num_classes) if not (y[train] == c).any()]
    if emptied:
        held = " and ".join(s for s, g in (("test", given["test"]), ("validation", given["val"])) if not len(g))
        counts = [int((y[given["train"]] == c).sum()) for c in emptied]
        which = ", ".join(f"{names[c]!r} ({n} image{'s' if n > 1 else ''})"
                          for c, n in zip(emptied, counts, strict=True))
        raise BadDataError(
            f"{where}: after the {held} images are held out of the training images, class(es) {which} have no "
            "training images left; the model could never learn them. Add images (a few per class at the very "
            "least, more for a useful score), or bring the held-out images yourself (val/ and test/ folders, or "
            "x_val/x_test arrays)."
        )
    return {k: torch.as_tensor(np.sort(v), dtype=torch.int64) for k, v in zip(SPLITS, (train, val, test), strict=True)}


def stream_splits(raw: RawData, index: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each split written once, in split order, next to the decode cache and memory-mapped from there, so a
    batch is one gather from a contiguous file and nothing is held in memory that the page cache does not."""
    assert raw.cache is not None
    digest = hashlib.sha256(b"".join(i.numpy().tobytes() + b"|" for i in index.values())).hexdigest()[:16]
    folder = raw.cache / f"splits-{digest}"
    if not folder.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=raw.cache))
        try:
            for name, idx in index.items():
                out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8,
                                                shape=(len(idx), *raw.images.shape[1:]))
                for start in range(0, len(idx), 4096):
                    part = idx[start : start + 4096]
                    out[start : start + len(part)] = raw.images[part].numpy()
                out.flush()
                del out
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():
                raise
    return {name: torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c")) for name in index}


def read_arrays(
    path: Path, channels: int | None, image_size: int | None
) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """(images NCHW, labels int64, split of each image, class names) from a .npz or .pt file, checked."""
    arrays = _load_file(path)
    if "x_train" not in arrays or "y_train" not in arrays:
        raise BadDataError(
            f"{path} holds {', '.join(sorted(arrays)) or 'nothing'}; it needs x_train and y_train (and optionally "
            "x_val, y_val, x_test, y_test, classes). Save it with np.savez(path, x_train=..., y_train=...)."
        )
    xs, ys, sources = [], [], []
    shape = None
    for split in SPLITS:
        x_key, y_key = f"x_{split}", f"y_{split}"
        if (x_key in arrays) != (y_key in arrays):
            raise BadDataError(f"{path} has {x_key if x_key in arrays else y_key} without "
                               f"{y_key if x_key in arrays else x_key}; give both or neither.")
        if x_key not in arrays:
            continue
        x = _images(arrays[x_key], f"{path}: {x_key}")
        y = _labels(arrays[y_key], f"{path}: {y_key}")
        if len(x) != len(y):
            raise BadDataError(f"{path}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels; they must "
                               "match one to one.")
        if shape is not None and x.shape[1:] != shape:
            raise BadDataError(f"{path}: {x_key} images are {tuple(x.shape[1:])} (C, H, W) but x_train's are "
                               f"{tuple(shape)}; all images must have one shape. Resize them before saving.")
        shape = x.shape[1:]
        xs.append(x)
        ys.append(y)
        sources += [split] * len(y)
    images, labels = torch.cat(xs), torch.cat(ys)
    names = _class_names(arrays.get("classes"), labels, path)
    images = _convert(images, channels, image_size, path)
    return images, labels, sources, names


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"data_file {str(path)!r} does not exist. Point data_file (relative paths are relative to the study "
            "file) at a .npz or .pt file with x_train and y_train.",
            dataset="arrays", directory=str(path.parent),
        )
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if path.suffix == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping):
                raise BadDataError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors with x_train, "
                                   "y_train, ...; save it with torch.save({'x_train': ..., 'y_train': ...}, path).")
            return dict(loaded)
    except BadDataError:
        raise
    except Exception as exc:  # zip, pickle and format errors: the message is what helps
        raise BadDataError(f"{path} could not be read as a {path.suffix} file ({type(exc).__name__}: {exc}). "
                           "Check that it was written completely by np.savez or torch.save.") from exc
    raise BadDataError(f"data_file {path} must end in .npz (NumPy's np.savez) or .pt (torch.save of a dict).")


def _images(value: Any, where: str) -> Tensor:
    """NCHW or NHWC (channels 1 or 3 last), or NHW; uint8 kept, integers 0..255 -> uint8, else float32."""
    try:
        x = torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
    except (TypeError, ValueError) as exc:
        raise BadDataError(f"{where}: images of mixed shapes or types ({exc}); stack them into one array of "
                           "shape (N, H, W, C) or (N, C, H, W).") from exc
    if x.dtype == torch.bool or x.is_complex():
        raise BadDataError(f"{where}: images have dtype {x.dtype}; use uint8 (0..255) or float.")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise BadDataError(f"{where}: image shape {tuple(x.shape[1:])} has neither 1 nor 3 channels first or "
                               "last; expected (N, H, W, C) or (N, C, H, W) with C = 1 or 3.")
    else:
        raise BadDataError(f"{where}: shape {tuple(x.shape)} is not a batch of images; expected (N, H, W), "
                           "(N, H, W, C) or (N, C, H, W).")
    if not x.is_floating_point() and x.dtype != torch.uint8:
        x = x.float() if len(x) and (x.min() < 0 or x.max() > 255) else x.to(torch.uint8)
    elif x.is_floating_point():
        x = x.float()
        if len(x) and not torch.isfinite(x).all():
            raise BadDataError(f"{where}: images contain NaN or infinite values; clean them before training.")
    return x.contiguous()


def _labels(value: Any, where: str) -> Tensor:
    y = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    if y.ndim != 1:
        raise BadDataError(f"{where}: labels have shape {tuple(y.shape)}; expected one integer class index per "
                           "image (shape (N,)), not one-hot rows.")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise BadDataError(f"{where}: labels have dtype {y.dtype}; they must be integer class indices 0..K-1 "
                           "(convert with y.astype(np.int64)).")
    if len(y) and y.min() < 0:
        raise BadDataError(f"{where}: label {int(y.min())} is negative; labels must be class indices 0..K-1.")
    return y.to(torch.int64)


def _class_names(value: Any, labels: Tensor, path: Path) -> list[str]:
    top = int(labels.max()) + 1 if len(labels) else 0
    if value is None:
        if top < 2:
            raise BadDataError(f"{path}: the labels name fewer than 2 classes; a classifier needs at least 2.")
        return [str(i) for i in range(top)]
    names = [str(v) for v in np.asarray(value).reshape(-1).tolist()]
    if top > len(names):
        raise BadDataError(f"{path}: label {top - 1} is out of range for the {len(names)} names in 'classes'; "
                           "labels must be indices into classes.")
    if len(names) < 2:
        raise BadDataError(f"{path}: 'classes' names {len(names)} class; a classifier needs at least 2.")
    return names


def _convert(x: Tensor, channels: int | None, image_size: int | None, path: Path) -> Tensor:
    """Channels (1 <-> 3) and size (shorter side, center crop), as the folder path does; square otherwise."""
    if channels is not None and x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        else:  # ITU-R 601-2 luma, as Pillow's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            luma = (x.float() * weights).sum(dim=1, keepdim=True)
            x = luma.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else luma
    h, w = x.shape[2], x.shape[3]
    if image_size is None:
        if h != w:
            raise BadDataError(f"{path}: images are {h}x{w}; set image_size in [objective] to resize and "
                               "center-crop them square.")
        return x
    if (h, w) == (image_size, image_size):
        return x
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    out = []
    for part in x.split(1024):
        resized = F.interpolate(part.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        resized = resized[:, :, top : top + image_size, left : left + image_size]
        out.append(resized.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else resized)
    return torch.cat(out).contiguous()
