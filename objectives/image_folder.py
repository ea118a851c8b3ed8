"""A user's folder of images, decoded once into a uint8 cache on disk that every later trial memory-maps.

Decoding thousands of JPEGs per trial would dominate a study, so the first load decodes, resizes (shorter
side to `image_size`, bilinear with antialiasing) and center-crops every image, converts it to RGB or
grayscale, and writes one `images.npy` (N, C, S, S) plus `meta.json` (labels, split folder, classes) under
a folder named by a hash of the file list (paths, sizes, mtimes), `image_size` and `channels`. A changed
folder hashes differently and is decoded again; an unchanged one loads in about a second (10,000 images).

Layouts: `root/train/<class>/*` (with optional `root/val/<class>/*` and `root/test/<class>/*`), or a flat
`root/<class>/*`. Class names are the folder names, sorted. Hidden files and folders are ignored, as are
files whose extension Pillow does not read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from objectives.errors import BadDataError, DatasetNotFoundError
from search.cache import cache_home

CACHE_VERSION = 4  # 2: 16-bit grayscale scaled to 8 bits, not clipped; 3: EXIF orientation; 4: float images 0..1
SPLIT_FOLDERS = ("train", "val", "test")


def image_extensions() -> frozenset[str]:
    """Every extension Pillow can open (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff, .gif, ...)."""
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class FolderIndex:
    """The images of a folder: paths relative to `root`, their class index and split folder ("train" for a
    flat layout), how many files in the class folders were not images, and how many files lay outside any class
    folder (next to them: an image there belongs to no class)."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    sources: tuple[str, ...]
    layout: str  # "split" or "flat"
    ignored: int
    outside: int = 0


@dataclass(frozen=True)
class Decoded:
    """A folder after decoding: `images` is memory-mapped from the cache (copy-on-write)."""

    images: np.ndarray
    labels: np.ndarray
    sources: tuple[str, ...]
    class_names: tuple[str, ...]
    skipped: tuple[str, ...]
    cache: Path


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path, extensions: frozenset[str]) -> tuple[list[Path], int]:
    """Image files under one class folder (recursively), sorted, and the count of other files."""
    images, other = [], 0
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        if path.suffix.lower() in extensions:
            images.append(path)
        else:
            other += 1
    return images, other


def _one_level_too_deep(only: Path, layout: str) -> str:
    """The fix when the one class folder holds no images of its own but 2 or more subfolders: the classes are
    one level further down (data_dir/images/<class>/*), else ""."""
    inner = [p.name for p in _visible_dirs(only)]
    if len(inner) < 2 or any(p.is_file() and not p.name.startswith(".") for p in only.iterdir()):
        return ""
    names = ", ".join(map(repr, inner[:5])) + (", ..." if len(inner) > 5 else "")
    fix = (f"point data_dir at {only}" if layout == "flat" else
           f"move the class folders from {only} up into {only.parent}")
    return (f"{only.parent} holds a single folder, {only.name!r}, with no images of its own but the folders "
            f"{names}: those look like the classes, one level deeper than hpo reads them (each folder in "
            f"{only.parent} is a class). {fix[0].upper()}{fix[1:]}.")


def scan(root: Path) -> FolderIndex:
    """List a folder's images by class and split folder; every way the layout can be wrong is a BadDataError
    (or DatasetNotFoundError for a missing folder) naming the folder and what to do."""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"data_dir {str(root)!r} does not exist or is not a folder. Point data_dir (relative paths are "
            "relative to the study file) at a folder with one subfolder per class, or with train/<class>/ "
            "(and optionally val/<class>/, test/<class>/) inside.",
            dataset="folder", directory=str(root),
        )
    layout = "split" if (root / "train").is_dir() else "flat"
    top = {"train": root / "train"} if layout == "split" else {"train": root}
    if layout == "split":
        top.update({s: root / s for s in ("val", "test") if (root / s).is_dir()})
    train_classes = [p.name for p in _visible_dirs(top["train"])]
    where = top["train"]
    if not train_classes:
        raise BadDataError(
            f"{where} has no class folders. Put each class's images in a subfolder named after the class "
            f"({where}/cat/*.jpg, {where}/dog/*.jpg, ...)."
        )
    if len(train_classes) < 2:
        raise BadDataError(
            _one_level_too_deep(where / train_classes[0], layout)
            or f"{where} has a single class folder ({train_classes[0]!r}); a classifier needs at least 2 classes. "
            "Add a folder per class."
        )
    extensions = image_extensions()
    files, labels, sources, ignored, outside = [], [], [], 0, 0
    for split, folder in top.items():
        classes = [p.name for p in _visible_dirs(folder)]
        outside += sum(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())
        unknown = sorted(set(classes) - set(train_classes))
        if unknown:
            raise BadDataError(
                f"{folder} has class folder(s) {', '.join(map(repr, unknown))} that {top['train']} lacks; the "
                "model could never be trained on them. Add them to the training folder or remove them here."
            )
        for name in classes:
            found, other = _class_files(folder / name, extensions)
            ignored += other
            if not found and split == "train":
                raise BadDataError(
                    f"class folder {folder / name} holds no images (files Pillow reads: .png, .jpg, .jpeg, .bmp, "
                    ".webp, .tif, ...). Add images or remove the folder."
                )
            files += [str(p.relative_to(root)) for p in found]
            labels += [train_classes.index(name)] * len(found)
            sources += [split] * len(found)
    return FolderIndex(root, tuple(train_classes), tuple(files), tuple(labels), tuple(sources), layout, ignored,
                       outside)


def cache_key(index: FolderIndex, image_size: int, channels: int) -> str:
    """Hash of what the decoded pixels depend on: each file's path, size and mtime, the size and channels."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size} {channels}\n".encode())
    for rel, label in zip(index.files, index.labels, strict=True):
        stat = (index.root / rel).stat()
        digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def decode_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file -> (C, S, S) uint8: shorter side resized to S, center-cropped, converted to RGB or L."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as image:
        image.draft(mode, (image_size, image_size))  # JPEG: decode at a reduced scale, still >= the target
        image = _eight_bit(_upright(image)).convert(mode)
        width, height = image.size
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _upright(image: Any) -> Any:
    """The photo as a viewer shows it: cameras and phones store the pixels as the sensor read them and the
    rotation in EXIF (Orientation), which Pillow does not apply by itself."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image


def _eight_bit(image: Any) -> Any:
    """A 16-bit grayscale image (PNG, TIFF: Pillow's modes I;16* and I) scaled to 8 bits (0..65535 -> 0..255);
    Pillow's own convert() to L or RGB clips every value above 255 instead, turning most such images white. An
    "I" image whose values all fit in 0..255 is 8-bit data in a wider type and is kept as it is. A floating-point
    image (a 32-bit float TIFF: mode F) is read as 0..1, scaled to 0..255, where Pillow would round each value to
    0 or 1 of 255 (black); one with values outside 0..1 is refused (``ValueError``, the image counts as unreadable):
    its scale cannot be guessed from one file."""
    from PIL import Image

    if image.mode == "F":
        return Image.fromarray((_unit_interval(np.asarray(image, dtype=np.float64)) * 255).round().astype(np.uint8),
                               "L")
    if not image.mode.startswith("I"):
        return image
    pixels = np.asarray(image).astype(np.int64)
    if image.mode == "I" and pixels.max(initial=0) <= 255:
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    return Image.fromarray((pixels.clip(0, 65535) / 257).round().astype(np.uint8), "L")


def _unit_interval(pixels: np.ndarray) -> np.ndarray:
    """A float image's pixels, checked to lie in 0..1 (NaN and infinities refused too)."""
    finite = pixels[np.isfinite(pixels)]
    if finite.size < pixels.size or (finite.size and (finite.min() < 0 or finite.max() > 1)):
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
        extra = f", {pixels.size - finite.size} not finite" if finite.size < pixels.size else ""
        raise ValueError(f"a floating-point image with values from {low:g} to {high:g}{extra}; float images are read "
                         "as 0..1 (0 black, 1 white): rescale it to 0..1, or save it as 8- or 16-bit")
    return pixels


def default_cache_root() -> Path:
    return cache_home() / "images"


def decode_folder(root: Path, image_size: int, channels: int, skip_bad: bool, cache_root: Path | None) -> Decoded:
    """The folder's images from the cache, decoding them first if the folder or the settings changed."""
    index = scan(root)
    cache = (cache_root or default_cache_root()) / f"{root.name or 'folder'}-{cache_key(index, image_size, channels)}"
    if not (cache / "meta.json").is_file():
        _write_cache(index, image_size, channels, cache)
    meta = json.loads((cache / "meta.json").read_text())
    bad = [b for b in meta["bad"]]
    if bad and not skip_bad:
        path, reason = bad[0]
        raise BadDataError(
            f"image {root / path} cannot be read ({reason}); {len(bad)} of {len(index.files)} images in {root} are "
            "unreadable or corrupt. Replace or delete them, or set skip_bad_images = true in [objective] to train "
            "without them."
        )
    images = np.load(cache / "images.npy", mmap_mode="c")
    keep = np.asarray(meta["ok"], dtype=bool)
    labels = np.asarray(meta["labels"], dtype=np.int64)
    sources = tuple(s for s, k in zip(meta["sources"], keep, strict=True) if k)
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) in {root} (skip_bad_images = true), e.g. {bad[0][0]}",
              file=sys.stderr)
    if not keep.all():
        images, labels = images[keep], labels[keep]
    return Decoded(images, labels, sources, tuple(meta["class_names"]), tuple(b[0] for b in bad), cache)


def _write_cache(index: FolderIndex, image_size: int, channels: int, cache: Path) -> None:
    """Decode every image in threads (Pillow releases the GIL while decoding) straight into a memory-mapped
    .npy in a temporary folder, then rename it into place: a reader never sees half a cache."""
    from tqdm import tqdm

    n = len(index.files)
    print(f"data folder {index.root}: {n} images in {len(index.class_names)} classes ({index.layout} layout"
          f"{f', {index.ignored} other files ignored' if index.ignored else ''}"
          f"{f', {index.outside} files outside the class folders ignored' if index.outside else ''}); decoding once to "
          f"{image_size}x{image_size}x{channels} into {cache}", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(n, channels, image_size, image_size))
        bad: list[tuple[str, str]] = []

        def decode(i: int) -> None:
            try:
                images[i] = decode_image(index.root / index.files[i], image_size, channels)
            except Exception as exc:  # Pillow raises OSError, ValueError, DecompressionBombError, SyntaxError...
                bad.append((index.files[i], f"{type(exc).__name__}: {exc}"))

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
                tqdm(total=n, desc="decoding", unit="img", file=sys.stderr, disable=None) as bar:
            for _ in pool.map(decode, range(n), chunksize=64):
                bar.update()
        images.flush()  # the memory map closes with this function; Linux renames an open file's folder fine
        failed = {path for path, _ in bad}
        meta = {
            "version": CACHE_VERSION, "root": str(index.root), "image_size": image_size, "channels": channels,
            "class_names": list(index.class_names), "files": list(index.files), "labels": list(index.labels),
            "sources": list(index.sources), "ok": [f not in failed for f in index.files],
            "bad": sorted(bad),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process wrote the same cache first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
