"""Synthetic ordinal images: seeded, independent of n, valid task specs, and the label is visible."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from numclip_cli import synthetic
from numclip_cli.errors import UsageError
from numclip_cli.tasks import get_task

KINDS = synthetic.list_generators()
DARK = 150  # luminance threshold between the dark shapes (<= 110) and the light background (>= ~185)


def _dark_mask(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < DARK


def _blobs(mask: np.ndarray) -> int:
    """Number of 4-connected components of True pixels."""
    seen = np.zeros_like(mask)
    count = 0
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_registry_lists_every_generator() -> None:
    assert KINDS == sorted(synthetic.GENERATORS) and {"dots", "fill"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_render_is_rgb_of_the_requested_size(kind: str) -> None:
    gen = synthetic.GENERATORS[kind]
    for size in (synthetic.MIN_SIZE, 64, 97):
        image = synthetic.render(kind, gen.high, seed=1, size=size)
        assert image.mode == "RGB" and image.size == (size, size)


@pytest.mark.parametrize("kind", KINDS)
def test_render_is_deterministic_per_seed(kind: str) -> None:
    label = synthetic.GENERATORS[kind].low + 1
    first = np.asarray(synthetic.render(kind, label, seed=7))
    assert np.array_equal(first, np.asarray(synthetic.render(kind, label, seed=7)))
    assert not np.array_equal(first, np.asarray(synthetic.render(kind, label, seed=8)))


@pytest.mark.parametrize("kind", KINDS)
def test_sample_labels_are_seeded_uniform_and_independent_of_n(kind: str) -> None:
    gen = synthetic.GENERATORS[kind]
    labels = synthetic.sample_labels(kind, 2000, seed=3)
    assert labels == synthetic.sample_labels(kind, 2000, seed=3)
    assert labels != synthetic.sample_labels(kind, 2000, seed=4)
    assert synthetic.sample_labels(kind, 17, seed=3) == labels[:17]
    counts = Counter(labels)
    assert set(counts) == set(gen.labels)
    expected = len(labels) / len(gen.labels)
    assert all(abs(c - expected) < 0.35 * expected for c in counts.values())


@pytest.mark.parametrize("kind", KINDS)
def test_task_spec_bins_cover_every_label(kind: str) -> None:
    gen = synthetic.GENERATORS[kind]
    task = synthetic.task_spec(kind)
    assert task.prompt.count("{}") == 1 and task.ranks == "integers" and task.unit
    assert (task.low, task.high) == (gen.low, gen.high)
    assert [task.bin_index(label) for label in gen.labels] == sorted(task.bin_index(lb) for lb in gen.labels)
    assert task.rank_values() == [float(label) for label in gen.labels]


@pytest.mark.parametrize("kind", KINDS)
def test_write_dataset_layout_and_task_file(kind: str, tmp_path: Path) -> None:
    n = 60
    task_path = synthetic.write_dataset(kind, tmp_path / "ds", n=n, seed=5, size=32)
    assert task_path == tmp_path / "ds" / synthetic.TASK_FILE
    task = get_task(str(task_path))
    assert task == synthetic.task_spec(kind)
    files = sorted((tmp_path / "ds").glob("*/*.png"))
    assert len(files) == n
    labels = synthetic.sample_labels(kind, n, seed=5)
    for path in files:
        label = int(path.parent.name)
        index = int(path.stem.removeprefix(f"{kind}_"))
        assert path.name == f"{kind}_{index:05d}.png"
        assert label == labels[index]
        task.bin_index(label)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_image_i_does_not_depend_on_n(kind: str, tmp_path: Path) -> None:
    synthetic.write_dataset(kind, tmp_path / "few", n=3, seed=9, size=32)
    synthetic.write_dataset(kind, tmp_path / "many", n=12, seed=9, size=32)
    few = sorted(p.relative_to(tmp_path / "few") for p in (tmp_path / "few").glob("*/*.png"))
    assert len(few) == 3
    for rel in few:
        assert (tmp_path / "few" / rel).read_bytes() == (tmp_path / "many" / rel).read_bytes()
    other = tmp_path / "other"
    synthetic.write_dataset(kind, other, n=3, seed=10, size=32)
    assert [p.read_bytes() for p in sorted(other.glob("*/*.png"))] != [
        (tmp_path / "few" / rel).read_bytes() for rel in few
    ]


@pytest.mark.parametrize("size", [synthetic.MIN_SIZE, 64])
def test_dots_count_equals_label(size: int) -> None:
    for seed in range(8):
        for label in synthetic.GENERATORS["dots"].labels:
            assert _blobs(_dark_mask(synthetic.render("dots", label, seed, size))) == label


@pytest.mark.parametrize("kind", ["fill", "size"])
@pytest.mark.parametrize("size", [synthetic.MIN_SIZE, 64])
def test_dark_area_grows_with_the_label(kind: str, size: int) -> None:
    gen = synthetic.GENERATORS[kind]
    for seed in range(8):
        area = [_dark_mask(synthetic.render(kind, label, seed, size)).sum() for label in gen.labels]
        assert all(a < b for a, b in zip(area, area[1:], strict=False)), area


def test_fill_level_matches_the_label_fraction() -> None:
    for seed in range(5):
        empty = _dark_mask(synthetic.render("fill", 0, seed)).sum()
        full = _dark_mask(synthetic.render("fill", 10, seed)).sum()
        for label in (3, 5, 8):
            area = _dark_mask(synthetic.render("fill", label, seed)).sum()
            assert (area - empty) / (full - empty) == pytest.approx(label / 10, abs=0.03)


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown synthetic kind"):
        synthetic.render("stars", 1, seed=0)
    with pytest.raises(UsageError, match="outside"):
        synthetic.render("dots", 0, seed=0)
    with pytest.raises(UsageError, match="at least"):
        synthetic.render("dots", 1, seed=0, size=synthetic.MIN_SIZE - 1)
    with pytest.raises(UsageError, match="at least 0"):
        synthetic.write_dataset("dots", tmp_path, n=-1)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",))))
@example('quote " backslash \\ tab \t newline \n del \x7f nul \x00 emoji \U0001f600 braces {}')
def test_toml_strings_round_trip(text: str) -> None:
    data = {"name": text, "n": 3, "rows": [{"name": text, "low": 1}]}
    assert tomllib.loads(synthetic._to_toml(data, comment="a\nb")) == data
