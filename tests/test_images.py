"""Tests for numclip_cli.images: the awkward-file corpus, and fuzzing that any bytes give RGB or an error."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import pytest
from helpers import EXPECTED, OK_SIZES, encode, gradient, make_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from numclip_cli.images import ImageLoadError, load_rgb

# Each decode of a small hostile file must finish well inside this; a hang would blow straight through it.
MAX_SECONDS_PER_CALL = 2.0
FUZZ = settings(
    max_examples=150,
    deadline=None,  # our own per-call bound below; hypothesis' deadline would flake on a loaded CI box
    derandomize=True,  # same examples every run
    database=None,  # nothing written into the tree
    suppress_health_check=[HealthCheck.too_slow],
)

# Every format Pillow writes that a photo folder plausibly holds, as (format, extension, save options).
FORMATS = {
    "JPEG": (".jpg", {"quality": 90}),
    "PNG": (".png", {}),
    "GIF": (".gif", {}),
    "WEBP": (".webp", {}),
    "TIFF": (".tif", {}),
    "BMP": (".bmp", {}),
}
VALID = {name: encode(gradient(48, 32), name, **options) for name, (_, options) in FORMATS.items()}

ERROR_REASONS = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated or corrupt image data",
    "text.jpg": "not a recognised image format",
    "huge_header.png": "image too large: ",
    "big_header.png": "image too large: 10000x10000 pixels exceeds limit 89478485",
    "dir.jpg": "is a directory",
    "broken.jpg": "no such file",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The corpus, written once for the module."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for fuzz inputs (module scope, so hypothesis can share it across examples)."""
    return tmp_path_factory.mktemp("fuzz")


def timed_load(path: Path) -> Image.Image | ImageLoadError:
    """load_rgb's image or its ImageLoadError; any other exception propagates and fails the test."""
    start = time.perf_counter()
    try:
        result: Image.Image | ImageLoadError = load_rgb(path)
    except ImageLoadError as e:
        result = e
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS_PER_CALL, f"{path.name} took {elapsed:.2f}s"
    return result


def assert_rgb_or_one_line_error(result: Image.Image | ImageLoadError) -> None:
    """The only two outcomes a caller may ever see."""
    if isinstance(result, ImageLoadError):
        assert str(result) and "\n" not in str(result)
    else:
        assert result.mode == "RGB"
        assert result.width > 0 and result.height > 0


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 3) -> bool:
    """Pixels equal up to lossy-codec noise."""
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def test_corpus_names_match_expectations(corpus: dict[str, Path]) -> None:
    assert set(corpus) == set(EXPECTED) == set(OK_SIZES) | set(ERROR_REASONS)


@pytest.mark.parametrize("name", sorted(OK_SIZES))
def test_ok_files_decode_to_rgb_of_upright_size(corpus: dict[str, Path], name: str) -> None:
    im = load_rgb(corpus[name])
    assert im.mode == "RGB"
    assert im.size == OK_SIZES[name]


@pytest.mark.parametrize(
    ("name", "xy", "rgb"),
    [
        ("rgba.png", (8, 8), (255, 127, 127)),  # 50% red over white is pink
        ("la.png", (8, 8), (127, 127, 127)),  # 50% black over white is mid grey
        ("p_transparency.png", (2, 8), (255, 255, 255)),  # transparent palette entry: white background
        ("p_transparency.png", (12, 8), (0, 255, 0)),
        ("gray16.png", (2, 8), (255, 255, 255)),  # 65535 -> 255
        ("gray16.png", (12, 8), (100, 100, 100)),  # 100*257 -> 100
        ("int32.tiff", (2, 8), (255, 255, 255)),  # 100000 is the max -> 255
        ("int32.tiff", (12, 8), (128, 128, 128)),  # 50000 -> 127.5 -> 128
        ("float.tiff", (2, 8), (255, 255, 255)),  # 1.0 -> 255
        ("float.tiff", (12, 8), (128, 128, 128)),  # 0.5 -> 128
        ("cmyk.jpg", (8, 8), (255, 0, 0)),
        ("exif_rotated.jpg", (10, 5), (255, 0, 0)),  # stored left (red) is upright top after 90 degrees CW
        ("exif_rotated.jpg", (10, 35), (0, 0, 255)),
        ("gray.png", (0, 0), (200, 200, 200)),
        ("tiny.png", (0, 0), (10, 20, 30)),
        ("animated.gif", (5, 5), (255, 0, 0)),  # the first frame, not the blue second one
        ("image.webp", (8, 8), (0, 255, 0)),
        ("image.tiff", (8, 8), (0, 0, 255)),
        ("image.bmp", (8, 8), (10, 20, 30)),
    ],
)
def test_ok_files_have_expected_colours(
    corpus: dict[str, Path], name: str, xy: tuple[int, int], rgb: tuple[int, int, int]
) -> None:
    pixel = load_rgb(corpus[name]).getpixel(xy)
    assert close(pixel, rgb), f"{name} at {xy}: {pixel} != {rgb}"


@pytest.mark.parametrize("name", sorted(ERROR_REASONS))
def test_error_files_raise_one_line_reason(corpus: dict[str, Path], name: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_rgb(corpus[name])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(ERROR_REASONS[name])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="^no such file$"):
        load_rgb(tmp_path / "never-written.png")


def test_max_pixels_is_checked_before_decoding(corpus: dict[str, Path]) -> None:
    with pytest.raises(ImageLoadError, match="^image too large: 40x20 pixels exceeds limit 799$"):
        load_rgb(corpus["exif_rotated.jpg"], max_pixels=799)
    assert load_rgb(corpus["exif_rotated.jpg"], max_pixels=800).size == (20, 40)


def test_bombs_leave_no_warning_and_no_changed_filters(corpus: dict[str, Path]) -> None:
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("big_header.png", "huge_header.png"):
            with pytest.raises(ImageLoadError, match="^image too large: "):
                load_rgb(corpus[name])
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters_before


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("F", [0.0, 0.25, 1.0], [0, 64, 255]),  # max <= 1: taken as 0-1
        ("F", [2.0, 3.0, 4.0], [0, 128, 255]),  # max > 1: min-max stretched
        ("F", [5.0, 5.0, 5.0], [0, 0, 0]),  # constant above 1: nothing to stretch
        ("F", [math.nan, math.inf, 1.0], [0, 0, 255]),  # non-finite values become 0
        ("I", [-5, 257, 65535], [0, 1, 255]),  # fits 16 bits: divided by 257, negatives clip
        ("I", [0, 100_000, 200_000], [0, 128, 255]),  # beyond 16 bits: scaled by the max
    ],
)
def test_high_bit_depth_scaling(tmp_path: Path, mode: str, values: list[float], expected: list[int]) -> None:
    im = Image.new(mode, (len(values), 1))
    im.putdata(values)
    im.save(tmp_path / "deep.tiff")
    rgb = load_rgb(tmp_path / "deep.tiff")
    assert [rgb.getpixel((x, 0)) for x in range(len(values))] == [(v, v, v) for v in expected]


def test_unconvertible_mode_is_named(corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # No file plugin yields premultiplied "La", which Pillow cannot convert: it stands in for any such mode.
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda im: Image.new("La", im.size))
    with pytest.raises(ImageLoadError, match="^unsupported image mode La$"):
        load_rgb(corpus["gray.png"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would block forever
    result = timed_load(fifo)
    assert isinstance(result, ImageLoadError) and str(result) == "not a regular file"


@pytest.mark.parametrize("name", sorted(VALID))
def test_every_fuzz_seed_format_decodes(scratch: Path, name: str) -> None:
    path = scratch / f"seed{FORMATS[name][0]}"
    path.write_bytes(VALID[name])
    result = timed_load(path)
    assert isinstance(result, Image.Image) and result.size == (48, 32)


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096))
def test_fuzz_random_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "random.jpg"
    path.write_bytes(data)
    assert_rgb_or_one_line_error(timed_load(path))


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), fraction=st.floats(min_value=0.0, max_value=1.0))
def test_fuzz_truncated_images(scratch: Path, name: str, fraction: float) -> None:
    data = VALID[name]
    path = scratch / f"truncated{FORMATS[name][0]}"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert_rgb_or_one_line_error(timed_load(path))


@FUZZ
@given(
    name=st.sampled_from(sorted(VALID)),
    mutations=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_mutated_headers(scratch: Path, name: str, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(VALID[name])
    for offset, value in mutations:  # the first 256 bytes hold every header field these formats have
        data[offset % len(data)] = value
    path = scratch / f"mutated{FORMATS[name][0]}"
    path.write_bytes(bytes(data))
    assert_rgb_or_one_line_error(timed_load(path))


def test_postscript_is_never_handed_to_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's EPS plugin runs Ghostscript on a PostScript file whatever its name; numclip asks only its raster
    decoders. A stand-in ``gs`` first on PATH records any call: none may happen."""
    calls = tmp_path / "gs-calls.log"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n[ "$1" = --version ] && echo 10.0\nexit 0\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    page = tmp_path / "photo.jpg"
    page.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_rgb(page)
    assert not calls.exists()
