"""Synthetic ordinal images for tests, demos and benchmarks: the label is something you can count or measure.

Each generator paints one kind of picture and knows its task: the label range, the ordered bins over it, the
unit and the prompt. ``dots`` counts dots, ``fill`` shows a bar filled in 10 % steps, ``size`` grows a square:
dark shapes drawn with Pillow on a light, noisy background, so a test can check that the label is really
visible. ``photo`` is real: crops of photographs that ship with scikit-image, labelled by how much haze veils them
(see ``numclip_cli.photo_suite``; needs the optional ``numclip[photos]``).

Everything is seeded: image ``i`` of a dataset depends only on ``(seed, split, i)``, never on how many images
are written. The ``train`` and ``test`` splits never share an image: for ``photo`` they use different
photographs, for the drawn kinds independent random streams of the same seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from numclip_cli import photo_suite
from numclip_cli.errors import UsageError
from numclip_cli.tasks import TaskSpec, task_from_dict

TASK_FILE = "task.toml"
MIN_SIZE = 32  # below this the smallest dots are a pixel or two and neighbours can touch
_NOISE_SIGMA = 3.0  # light sensor-like noise; far below the light/dark gap the tests threshold on

SPLITS = ("train", "test")

Draw = Callable[[ImageDraw.ImageDraw, int, np.random.Generator, int], None]
Paint = Callable[[int, np.random.Generator, int, str], Image.Image]  # (label, rng, size, split) -> RGB image


def _nothing_to_prepare() -> None:
    """Drawn generators need nothing beyond Pillow and numpy."""


@dataclass(frozen=True)
class Generator:
    """An ordinal image generator: how to draw a label, and the task (unit, prompt, bins) it belongs to."""

    name: str
    unit: str
    prompt: str  # exactly one "{}" for the bin words
    bins: tuple[tuple[str, int, int], ...]  # (words, low, high): ordered, contiguous, inclusive integer edges
    paint: Paint  # the whole image showing a label
    prepare: Callable[[], object] = _nothing_to_prepare  # fails early (UsageError) when a dependency is missing

    @property
    def low(self) -> int:
        """Smallest label."""
        return self.bins[0][1]

    @property
    def high(self) -> int:
        """Largest label."""
        return self.bins[-1][2]

    @property
    def labels(self) -> range:
        """Every label the generator draws, in order."""
        return range(self.low, self.high + 1)

    def spec_dict(self) -> dict[str, Any]:
        """The task spec as plain data: the one source of both ``task_spec`` and ``task.toml``."""
        return {
            "name": self.name,
            "unit": self.unit,
            "prompt": self.prompt,
            "ranks": "integers",
            "bins": [{"name": words, "low": low, "high": high} for words, low, high in self.bins],
        }


def _dark(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random dark colour (every channel <= 110, so luminance stays well below the background)."""
    return tuple(int(c) for c in rng.integers(0, 111, size=3))


def _light(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random light colour (every channel >= 200)."""
    return tuple(int(c) for c in rng.integers(200, 256, size=3))


def _draw_dots(canvas: ImageDraw.ImageDraw, label: int, rng: np.random.Generator, size: int) -> None:
    """``label`` dots, one per randomly chosen cell of a 4×4 grid, so they never touch."""
    cell = size / 4
    for index in rng.choice(16, size=label, replace=False):
        radius = cell * rng.uniform(0.15, 0.35)
        slack = cell / 2 - radius - 1  # keep a pixel of gap to the cell border
        cx = (index % 4 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (index // 4 + 0.5) * cell + rng.uniform(-slack, slack)
        canvas.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=_dark(rng))


def _draw_fill(canvas: ImageDraw.ImageDraw, label: int, rng: np.random.Generator, size: int) -> None:
    """A vertical bar (dark outline, light inside) filled from the bottom to ``label`` tenths."""
    # Geometry is drawn before the label is used, so one seed gives the same bar at every fill level.
    width = round(size * rng.uniform(0.2, 0.4))
    height = round(size * rng.uniform(0.7, 0.85))
    left = int(rng.integers(1, size - width))
    top = int(rng.integers(1, size - height))
    outline, glass, liquid = _dark(rng), _light(rng), _dark(rng)
    canvas.rectangle((left, top, left + width, top + height), fill=glass, outline=outline, width=1)
    inner = height - 1
    level = round(inner * label / 10)
    if level:
        canvas.rectangle((left + 1, top + height - level, left + width - 1, top + height - 1), fill=liquid)


def _draw_size(canvas: ImageDraw.ImageDraw, label: int, rng: np.random.Generator, size: int) -> None:
    """A dark square whose side is ``label`` × 9 % of the image width, at a random place."""
    fx, fy, colour = rng.uniform(), rng.uniform(), _dark(rng)
    side = max(1, round(size * 0.09 * label))
    left, top = round(fx * (size - side)), round(fy * (size - side))
    canvas.rectangle((left, top, left + side - 1, top + side - 1), fill=colour)


def _drawing(draw: Draw) -> Paint:
    """A painter that calls ``draw`` on a light background with a gentle gradient, then adds light noise."""

    def paint(label: int, rng: np.random.Generator, size: int, split: str) -> Image.Image:
        # The split only changes the seed stream (see _item), not how a picture is drawn.
        base = rng.integers(195, 246, size=3)
        ramp = np.linspace(-1.0, 1.0, size)
        gx, gy = rng.uniform(-8, 8, size=2)
        shade = gx * ramp[None, :] + gy * ramp[:, None]
        background = np.clip(base[None, None, :] + shade[:, :, None], 0, 255).astype(np.uint8)
        image = Image.fromarray(background, "RGB")
        draw(ImageDraw.Draw(image), label, rng, size)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, _NOISE_SIGMA, size=(size, size, 3))
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")

    return paint


GENERATORS: dict[str, Generator] = {
    g.name: g
    for g in (
        Generator(
            name="dots",
            unit="dots",
            prompt="a picture with {} dots.",
            bins=(
                ("one or two", 1, 2),
                ("three or four", 3, 4),
                ("five or six", 5, 6),
                ("seven or eight", 7, 8),
                ("nine or ten", 9, 10),
            ),
            paint=_drawing(_draw_dots),
        ),
        Generator(
            name="fill",
            unit="tenths full",
            prompt="a bar that is {}.",
            bins=(("empty", 0, 1), ("low", 2, 3), ("half full", 4, 6), ("high", 7, 8), ("full", 9, 10)),
            paint=_drawing(_draw_fill),
        ),
        Generator(
            name="size",
            unit="size step (9 % of the image width)",
            prompt="a picture of a {} square.",
            bins=(("tiny", 1, 2), ("small", 3, 4), ("medium", 5, 6), ("large", 7, 8), ("huge", 9, 10)),
            paint=_drawing(_draw_size),
        ),
        Generator(
            name="photo",
            unit="haze step (contrast ×0.9 per step under a light veil)",
            prompt="a photo with {} haze.",
            bins=(("no", 1, 2), ("light", 3, 4), ("moderate", 5, 6), ("heavy", 7, 8), ("dense", 9, 10)),
            paint=photo_suite.paint,
            prepare=photo_suite.require_skimage,
        ),
    )
}


def list_generators() -> list[str]:
    """Names of the synthetic generators.

    >>> list_generators()
    ['dots', 'fill', 'photo', 'size']
    """
    return sorted(GENERATORS)


def get_generator(kind: str) -> Generator:
    """A generator by name; an unknown name is a ``UsageError``."""
    try:
        return GENERATORS[kind]
    except KeyError:
        raise UsageError(f"unknown synthetic kind {kind!r}: use one of {list_generators()}") from None


def task_spec(kind: str) -> TaskSpec:
    """The task a generator's labels belong to, as written to ``task.toml``.

    >>> task_spec("fill").bin_names
    ['empty', 'low', 'half full', 'high', 'full']
    """
    return task_from_dict(get_generator(kind).spec_dict(), source=f"synthetic task {kind!r}")


def _check_split(split: str) -> None:
    """A usage error unless ``split`` is ``train`` or ``test``."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {list(SPLITS)}")


def render(kind: str, label: int, seed: int, size: int = 64, split: str = "train") -> Image.Image:
    """One RGB ``size``×``size`` image showing ``label``; the same arguments give the same pixels."""
    gen = get_generator(kind)
    if label not in gen.labels:
        raise UsageError(f"label {label} is outside the {kind!r} range {gen.low}–{gen.high}")
    if size < MIN_SIZE:
        raise UsageError(f"image size must be at least {MIN_SIZE} pixels, got {size}")
    _check_split(split)
    gen.prepare()
    return gen.paint(label, np.random.default_rng(seed), size, split)


def _item(gen: Generator, seed: int, index: int, split: str) -> tuple[int, int]:
    """Label and render seed of dataset item ``index``: a function of ``(seed, split, index)`` only."""
    # The train stream keeps the historical (seed, index) key so existing datasets are unchanged.
    key = (seed, index) if split == "train" else (seed, index, SPLITS.index(split))
    rng = np.random.default_rng(key)
    label = int(rng.integers(gen.low, gen.high + 1))
    return label, int(rng.integers(2**63))


def sample_labels(kind: str, n: int, seed: int, split: str = "train") -> list[int]:
    """``n`` labels drawn uniformly over the generator's range; the first ``k`` do not depend on ``n``."""
    gen = get_generator(kind)
    _check_split(split)
    return [_item(gen, seed, i, split)[0] for i in range(n)]


def _toml_value(value: Any) -> str:
    """One TOML value; strings use JSON quoting, which is valid TOML basic-string syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # TOML, unlike JSON, forbids a raw DEL character inside basic strings.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _to_toml(data: dict[str, Any], comment: str = "") -> str:
    """A flat table of scalars plus arrays of flat tables (the task-spec shape) as TOML text."""
    lines = [f"# {line}" for line in comment.splitlines()]
    tables = {k: v for k, v in data.items() if isinstance(v, list)}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if k not in tables]
    for key, rows in tables.items():
        for row in rows:
            lines.append(f"[[{_toml_key(key)}]]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


def write_dataset(kind: str, out_dir: Path, n: int, seed: int = 0, size: int = 64, split: str = "train") -> Path:
    """Write ``n`` images as ``out_dir/<label>/<kind>_<index:05d>.png`` and ``task.toml``; return its path.

    ``split`` is ``train`` or ``test``: the two never share an image (for ``photo``, not even a photograph).
    """
    gen = get_generator(kind)
    if n < 0:
        raise UsageError(f"number of images must be at least 0, got {n}")
    if size < MIN_SIZE:
        raise UsageError(f"image size must be at least {MIN_SIZE} pixels, got {size}")
    _check_split(split)
    gen.prepare()  # a missing optional dependency fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        label, image_seed = _item(gen, seed, index, split)
        folder = out_dir / str(label)
        folder.mkdir(exist_ok=True)
        render(kind, label, image_seed, size, split).save(folder / f"{kind}_{index:05d}.png", format="PNG")
    task_path = out_dir / TASK_FILE
    comment = f"Synthetic {kind!r} task written by numclip_cli.synthetic (seed {seed}, {split} split, {n} images)."
    task_path.write_text(_to_toml(gen.spec_dict(), comment=comment), encoding="utf-8")
    return task_path
