"""Drawing: the reliability diagram that ``numclip calibrate --plot`` writes, with Pillow alone (no plotting library).

The diagram shows, per equal-width confidence bin, the accuracy of the most probable bin against its mean
confidence, before (T = 1) and after temperature scaling; a point's area grows with the samples it stands for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from numclip_cli import metrics
from numclip_cli.atomic import atomic_open
from numclip_cli.calibration import HeldOut

PLOT_SIZE = (800, 660)
_BEFORE, _AFTER, _GRID, _INK = (214, 69, 65), (38, 110, 200), (225, 225, 225), (30, 30, 30)


def save_reliability_diagram(path: str | Path, held: HeldOut, temperature: float, n_bins: int = 15,
                             title: str = "") -> None:
    """A PNG reliability diagram (accuracy vs. confidence of the top bin) before and after the temperature."""
    width, height = PLOT_SIZE
    left, right, top, bottom = 96, width - 32, 100, height - 78
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=17), ImageFont.load_default(size=14)

    def xy(confidence: float, accuracy: float) -> tuple[float, float]:
        return left + confidence * (right - left), bottom - accuracy * (bottom - top)

    for step in range(6):  # grid, ticks and tick labels every 0.2
        v = step / 5
        x, y = xy(v, v)
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((x, bottom + 8), f"{v:.1f}", fill=_INK, font=small, anchor="mt")
        draw.text((left - 8, y), f"{v:.1f}", fill=_INK, font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=_INK, width=2)
    _dashed(draw, xy(0, 0), xy(1, 1), fill=(120, 120, 120))

    eces = {}
    for label, temp, colour, offset in (("before", 1.0, _BEFORE, -3), ("after", temperature, _AFTER, 3)):
        probs = held.probs(temp)
        eces[label] = metrics.ece(probs, held.bins, n_bins=n_bins)
        confidence, accuracy, count = metrics.reliability_bins(probs, held.bins, n_bins=n_bins)
        points = [(xy(c, a), n) for c, a, n in zip(confidence, accuracy, count, strict=True) if n > 0]
        if len(points) > 1:
            draw.line([p for p, _ in points], fill=colour, width=3, joint="curve")
        for (x, y), n in points:  # marker area grows with the number of samples in the bin
            r = 3 + 9 * math.sqrt(n / len(held))
            draw.ellipse([x - r + offset, y - r, x + r + offset, y + r], fill=colour, outline="white")

    heading = title or "Reliability diagram"
    draw.text((width / 2, 14), heading, fill=_INK, font=font, anchor="mt")
    draw.text((width / 2, 40), f"n = {len(held)}, {n_bins} confidence bins; ECE {eces['before']:.3f} before, "
              f"{eces['after']:.3f} after (T = {temperature:.3g})", fill=_INK, font=small, anchor="mt")
    draw.text(((left + right) / 2, height - 34), "confidence (probability of the predicted bin)", fill=_INK,
              font=font, anchor="mt")
    ylabel = Image.new("RGB", (bottom - top, 24), "white")
    ImageDraw.Draw(ylabel).text(((bottom - top) / 2, 12), "accuracy (predicted bin is right)", fill=_INK,
                                font=font, anchor="mm")
    image.paste(ylabel.rotate(90, expand=True), (16, top))

    # the legend sits in one row above the axes, where it can hide no point
    legend = [("before (T = 1)", _BEFORE), (f"after (T = {temperature:.3g})", _AFTER),
              ("perfect calibration", (120, 120, 120))]
    lx, y = left + 40, top - 18
    for row, (label, colour) in enumerate(legend):
        if row == 2:
            _dashed(draw, (lx, y), (lx + 30, y), fill=colour)
        else:
            draw.line([(lx, y), (lx + 30, y)], fill=colour, width=3)
            draw.ellipse([lx + 10, y - 5, lx + 20, y + 5], fill=colour)
        draw.text((lx + 40, y), label, fill=_INK, font=small, anchor="lm")
        lx += 40 + draw.textlength(label, font=small) + 40

    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")


def _dashed(draw: Any, start: tuple[float, float], end: tuple[float, float], fill: tuple[int, int, int],
            dash: float = 8.0) -> None:
    """A dashed straight line (ImageDraw draws only solid ones)."""
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    pieces = max(1, int(length // dash))
    for i in range(0, pieces, 2):
        a, b = i / pieces, min(i + 1, pieces) / pieces
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=fill, width=2)
