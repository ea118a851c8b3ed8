"""Writers for small image folders and array files, in the formats a user brings (no network needed).

Each class gets its own learnable pattern (a bright square in a class-specific place on a noisy background),
so a short training run can tell the classes apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def class_image(label: int, index: int, size: tuple[int, int] = (24, 20), channels: int = 3) -> np.ndarray:
    """(H, W, C) uint8: noise plus a bright square whose position and colour depend on the class."""
    width, height = size
    rng = np.random.default_rng(1000 * label + index)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    side = max(2, min(width, height) // 3)
    top = (label * side) % max(1, height - side)
    left = (label * 7) % max(1, width - side)
    image[top : top + side, left : left + side, label % 3] = 250
    return image if channels == 3 else image.mean(axis=2, keepdims=True).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode).save(path)
    return path


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 12,
    layout: str = "flat",
    ext: str = "png",
    size: tuple[int, int] = (24, 20),
    channels: int = 3,
    splits: dict[str, int] | None = None,
) -> Path:
    """`root/<class>/i.<ext>` (flat) or `root/<split>/<class>/i.<ext>` (split: `splits` gives images per class
    for each split folder, default train only). Returns root."""
    counts = {"": per_class} if layout == "flat" else (splits or {"train": per_class})
    offset = 0
    for split, count in counts.items():
        for label, name in enumerate(classes):
            for i in range(count):
                path = root / split / name / f"{i}.{ext}"
                write_image(path, class_image(label, offset + i, size, channels))
        offset += count
    return root


def make_arrays(n_train: int = 60, n_classes: int = 3, size: int = 12, layout: str = "NHWC",
                dtype: str = "uint8") -> dict[str, np.ndarray]:
    """x_train/y_train (and x_test/y_test) with the class patterns above, in the requested layout and dtype."""
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_train // 3)):
        labels = np.arange(n) % n_classes
        images = np.stack([class_image(int(y), i + (0 if split == "train" else 10_000), (size, size))
                           for i, y in enumerate(labels)])
        if layout == "NCHW":
            images = images.transpose(0, 3, 1, 2)
        out[f"x_{split}"] = (images / 255.0).astype(dtype) if dtype.startswith("float") else images.astype(dtype)
        out[f"y_{split}"] = labels.astype(np.int64)
    return out
