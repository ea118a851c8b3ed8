"""Write scikit-learn's digits as an image folder, the layout `dataset = "folder"` reads:

    OUT/train/<digit>/<n>.png   (80% of the images)
    OUT/val/<digit>/<n>.png     (20%)

so `hpo run studies/folder_example.toml` works offline. Each 8x8 image (0..16) is scaled to 0..255 and
enlarged to 32x32 (nearest neighbour), grayscale PNG.

    python examples/make_sample_folder.py data/digits-folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_folder(out: Path, size: int = 32, val_share: float = 0.2, seed: int = 0) -> int:
    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    n_val = round(val_share * len(order))
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        pixels = (bunch.images[i] * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.NEAREST)
        path = out / split / str(bunch.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (created; existing files are overwritten)")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels (default 32)")
    args = parser.parse_args()
    count = write_folder(args.out, args.size)
    print(f"wrote {count} digit images to {args.out}/train and {args.out}/val (10 classes)")


if __name__ == "__main__":
    main()
