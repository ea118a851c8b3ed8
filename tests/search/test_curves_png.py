"""A trial's curves PNG (Pillow): each series drawn in its own panel and colour, non-finite values left out."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from search.curves_png import COLORS, HEIGHT, WIDTH, trial_curves_png

CURVES = {"train_loss": [2.3 * 0.8**i for i in range(20)], "val_loss": [2.2 * 0.82**i + 0.05 for i in range(20)],
          "val_accuracy": [min(0.99, 0.1 + 0.05 * i) for i in range(20)]}


def _columns_of(image: Image.Image, color: tuple[int, int, int]) -> list[int]:
    """The x of every pixel in exactly this colour (anti-aliasing is off for lines: their pixels are exact)."""
    pixels = image.load()
    return [x for x in range(image.width) for y in range(image.height) if pixels[x, y] == color]


def test_losses_left_accuracy_right_each_in_its_colour_across_all_epochs(tmp_path: Path) -> None:
    path = trial_curves_png(CURVES, "trial 3 (complete)", tmp_path / "deep" / "trial-3-curves.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
    image = image.convert("RGB")
    middle = WIDTH // 2
    for name in ("train_loss", "val_loss"):
        xs = _columns_of(image, COLORS[name])
        plotted = [x for x in xs if x > 58]  # right of the y labels: the curve, not the legend's swatch alone
        assert plotted and max(plotted) < middle, name
        assert max(plotted) - min(plotted) > 250  # epoch 0 to 19 spans the panel
    xs = _columns_of(image, COLORS["val_accuracy"])
    assert xs and min(xs) > middle and max(xs) - min(xs) > 250


def test_a_nan_loss_and_missing_series_are_left_out_not_an_error(tmp_path: Path) -> None:
    broken = {"train_loss": [2.3, 1.5, math.nan], "val_loss": [2.2, math.inf, 1.4], "val_accuracy": [0.1, 0.3, 0.2]}
    image = Image.open(trial_curves_png(broken, "trial 4 (pruned)", tmp_path / "a.png")).convert("RGB")
    assert _columns_of(image, COLORS["train_loss"]) and _columns_of(image, COLORS["val_loss"])
    empty = Image.open(trial_curves_png({}, "trial 5 (failed)", tmp_path / "b.png")).convert("RGB")
    assert not any(_columns_of(empty, c) for c in COLORS.values())
    one = Image.open(trial_curves_png({"val_accuracy": [0.5]}, "trial 6", tmp_path / "c.png")).convert("RGB")
    assert _columns_of(one, COLORS["val_accuracy"]) and not _columns_of(one, COLORS["train_loss"])
