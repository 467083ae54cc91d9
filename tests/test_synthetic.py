"""Synthetic ordinal images: seeded, independent of n, valid task specs, and the label is visible."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from numclip_cli import photo_suite, synthetic
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


# ------------------------------------------------------------------------------------- splits (every kind)
@pytest.mark.parametrize("kind", KINDS)
def test_train_and_test_splits_never_share_an_image(kind: str, tmp_path: Path) -> None:
    synthetic.write_dataset(kind, tmp_path / "train", n=20, seed=4, size=32)
    synthetic.write_dataset(kind, tmp_path / "test", n=20, seed=4, size=32, split="test")
    train = {p.read_bytes() for p in (tmp_path / "train").glob("*/*.png")}
    test = {p.read_bytes() for p in (tmp_path / "test").glob("*/*.png")}
    assert len(train) == len(test) == 20 and not train & test
    assert synthetic.sample_labels(kind, 20, seed=4, split="test") != synthetic.sample_labels(kind, 20, seed=4)


def test_an_unknown_split_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown split"):
        synthetic.write_dataset("dots", tmp_path / "ds", n=1, split="validation")
    with pytest.raises(UsageError, match="unknown split"):
        synthetic.render("photo", 1, seed=0, split="val")
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------------ the photo suite
def test_photo_splits_are_disjoint_mixed_and_load_offline() -> None:
    train, test = set(photo_suite.TRAIN_PHOTOS), set(photo_suite.TEST_PHOTOS)
    assert len(train) == len(photo_suite.TRAIN_PHOTOS) and len(test) == len(photo_suite.TEST_PHOTOS)
    assert not train & test and len(train) > len(test) >= 5
    for names in (train, test):
        colour = set()
        for name in names:
            pixels = photo_suite.load_photo(name)
            assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
            assert min(pixels.shape[:2]) >= 64
            colour.add(bool(np.ptp(pixels.astype(int), axis=2).mean() > 2))
        assert colour == {True, False}  # both splits hold colour and grey photographs


def test_photo_docstring_lists_each_split() -> None:
    lines = photo_suite.__doc__.replace("\n  ", " ").splitlines()
    for split, names in photo_suite.SPLITS.items():
        (line,) = [line for line in lines if line.startswith(f"- ``{split}``")]
        assert f"({len(names)})" in line and all(name in line for name in names)


def test_photo_images_come_only_from_their_splits_photographs(tmp_path: Path, monkeypatch) -> None:
    used: dict[str, set[str]] = {"train": set(), "test": set()}
    load = photo_suite.load_photo
    for split in used:
        monkeypatch.setattr(photo_suite, "load_photo", lambda name, s=split: used[s].add(name) or load(name))
        synthetic.write_dataset("photo", tmp_path / split, n=80, seed=0, size=32, split=split)
    assert used == {"train": set(photo_suite.TRAIN_PHOTOS), "test": set(photo_suite.TEST_PHOTOS)}


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_photo_images_are_real_photo_content(split: str) -> None:
    correlations = []
    for seed in range(30):
        grey = np.asarray(synthetic.render("photo", 1, seed, split=split).convert("L"), dtype=float)
        assert grey.std() > 3 and len(np.unique(grey)) >= 20  # not flat
        correlations.append(np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1])
    # Neighbouring pixels of a photograph are strongly correlated; a flat picture plus noise gives about 0.
    assert min(correlations) > 0.3 and np.median(correlations) > 0.6


def test_photo_level_takes_the_same_share_of_contrast_per_step() -> None:
    for seed in range(6):
        stds = [np.asarray(synthetic.render("photo", level, seed), dtype=float).std() for level in photo_suite.LEVELS]
        assert all(a > b for a, b in zip(stds, stds[1:], strict=False)), stds
        for level, std in zip(photo_suite.LEVELS, stds, strict=True):
            assert std / stds[0] == pytest.approx(photo_suite.contrast(level), abs=0.02)
    assert synthetic.task_spec("photo").rank_values() == [float(level) for level in photo_suite.LEVELS]


def test_importing_synthetic_does_not_import_scikit_image() -> None:
    code = "import sys, numclip_cli.synthetic, numclip_cli.cli.app; print('skimage' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_photo_without_scikit_image_is_a_one_line_error_naming_the_extra(run_cli, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage.data` raise ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    photo_suite.load_photo.cache_clear()  # as in a fresh process: no photograph loaded yet
    result = run_cli(["synth", "photo", "--out", tmp_path / "photos", "--n", "3"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "numclip[photos]" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "photos").exists()
    with pytest.raises(UsageError, match=r"numclip\[photos\]"):
        synthetic.render("photo", 1, seed=0)
    ok = run_cli(["synth", "dots", "--out", tmp_path / "dots", "--n", "3"])  # the drawn kinds need no extra
    assert ok.exit_code == 0 and len(list((tmp_path / "dots").glob("*/*.png"))) == 3


def test_cli_writes_the_photo_test_split(run_cli, tmp_path: Path) -> None:
    result = run_cli(["synth", "photo", "--out", tmp_path / "ds", "--n", "12", "--seed", "3", "--split", "test"])
    assert result.exit_code == 0, result.stderr
    expected = tmp_path / "api"
    synthetic.write_dataset("photo", expected, n=12, seed=3, split="test")
    files = sorted(p.relative_to(tmp_path / "ds") for p in (tmp_path / "ds").glob("*/*.png"))
    assert len(files) == 12
    assert all((tmp_path / "ds" / rel).read_bytes() == (expected / rel).read_bytes() for rel in files)
    assert get_task(str(tmp_path / "ds" / synthetic.TASK_FILE)) == synthetic.task_spec("photo")
