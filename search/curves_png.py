"""A trial's learning curves as a small PNG, drawn with Pillow: loss (train and val) and validation accuracy
against epoch, side by side, for the dashboard's artifacts.

Every trial draws one as it ends, so it must cost next to nothing: matplotlib took 70 ms on a quiet 2-core
machine and 220 ms on a busy one, the largest part of a quickstart trial's fixed cost (BENCHMARKS.md section 8);
this takes a few milliseconds. The study-level plots stay matplotlib's (search/plots.py), drawn once per report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 300
TOP, BOTTOM, GAP, LEFT, RIGHT = 50, 40, 64, 58, 12  # margins in pixels: title and legend, epoch axis, between
COLORS = {"train_loss": (31, 119, 180), "val_loss": (255, 127, 14), "val_accuracy": (42, 157, 143)}
GRID, AXIS, TEXT = (225, 225, 225), (90, 90, 90), (30, 30, 30)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font, with FreeType
    except (TypeError, ImportError, OSError):  # an older Pillow or one built without FreeType: its bitmap font
        return ImageFont.load_default()


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: dict[str, list[float]],
           y_name: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    """One panel: frame, three y ticks, the epoch axis, each series as a line with points, and a legend."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=AXIS)
    finite = [v for values in series.values() for v in values if math.isfinite(v)]
    epochs = max((len(values) for values in series.values()), default=0)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.06
    lo, hi = lo - pad, hi + pad
    last = max(epochs - 1, 1)

    def at(epoch: int, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * epoch / last, y1 - (y1 - y0) * (value - lo) / (hi - lo)

    for i in range(3):  # y ticks at the bottom, middle and top of the data's range, with grid lines
        value = lo + pad + (hi - lo - 2 * pad) * i / 2
        y = at(0, value)[1]
        draw.line([(x0 + 1, y), (x1 - 1, y)], fill=GRID)
        draw.text((x0 - 4, y), f"{value:.3g}", fill=TEXT, font=font, anchor="rm")
    for epoch in sorted({0, last // 2, last} if epochs > 1 else {0}):
        x = at(epoch, lo)[0]
        draw.line([(x, y1), (x, y1 + 4)], fill=AXIS)
        draw.text((x, y1 + 6), str(epoch), fill=TEXT, font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, y1 + 22), "epoch", fill=TEXT, font=font, anchor="mt")
    draw.text((x0, y0 - 6), y_name, fill=TEXT, font=font, anchor="lb")  # the axis name, then the legend, above
    legend_x = x0 + 80
    for name, values in series.items():
        color = COLORS.get(name, AXIS)
        run: list[tuple[float, float]] = []
        for epoch, value in enumerate([*values, math.nan]):  # a non-finite value (a NaN loss) breaks the line
            if math.isfinite(value):
                run.append(at(epoch, value))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            for x, y in run:
                draw.ellipse([(x - 2.5, y - 2.5), (x + 2.5, y + 2.5)], fill=color)
            run = []
        draw.line([(legend_x, y0 - 12), (legend_x + 20, y0 - 12)], fill=color, width=2)
        draw.text((legend_x + 25, y0 - 12), name, fill=TEXT, font=font, anchor="lm")
        legend_x += 130


def trial_curves_png(history: Mapping[str, Sequence[float]], title: str, path: Path) -> Path:
    """Loss (train and val) and validation accuracy against epoch, side by side; missing keys are left out."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, title_font = _font(12), _font(15)
    draw.text((WIDTH / 2, 8), title, fill=TEXT, font=title_font, anchor="mt")
    half = (WIDTH - LEFT - RIGHT - GAP) // 2
    losses = {k: [float(v) for v in history[k]] for k in ("train_loss", "val_loss") if history.get(k)}
    accuracy = {"val_accuracy": [float(v) for v in history["val_accuracy"]]} if history.get("val_accuracy") else {}
    _panel(draw, (LEFT, TOP, LEFT + half, HEIGHT - BOTTOM), losses, "loss", font)
    _panel(draw, (LEFT + half + GAP, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM), accuracy, "accuracy", font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)  # zlib's fastest: 8.6 ms against 12 ms, the file 14 kB not 11
    return path
