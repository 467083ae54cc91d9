"""Helpers shared by the test modules (test modules never import each other): CLI arguments and record checks, and
a deterministic corpus of awkward image files.

Importable by any test as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``: it has no
``__init__.py``). Fixtures live in ``conftest.py``.

Image corpus: ``make_corpus(dir)`` writes every file and returns name -> path; ``EXPECTED`` says whether each name
must decode (``"ok"``) or raise ``ImageLoadError`` (``"error"``), and ``OK_SIZES`` gives the upright
(width, height) of each ok file after decoding.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from numclip_cli.tasks import get_task

# ------------------------------------------------------------------------------------------ CLI runs
TINY = "numclip-tiny"
# the tiny random-init model on the CPU: tests compare numbers with CPU-computed ones, also on a CUDA host
MODEL = ["--model", TINY, "--pretrained", "none", "--task", "age", "--device", "cpu"]
AGE_BINS = get_task("age").bin_names
RECORD_FIELDS = {"path", "status", "task", "value", "bin", "bin_index", "probs", "expected_bin"}
SUBPROCESS_TIMEOUT = 120


def ddp_and_single_process_runs(tmp_path: Path, device: str, *options: str) -> tuple[dict, dict, str]:
    """Train numclip-tiny on a small fill dataset with 2-process DDP (torchrun) and in one process with the same
    global batch: the last checkpoints' tensors of both, and the DDP run's stdout."""
    import socket
    import subprocess
    import sys

    from numclip_cli.checkpoint import read_checkpoint
    from numclip_cli.synthetic import write_dataset
    from numclip_cli.trainer import last_path

    data = tmp_path / "data"
    write_dataset("fill", data, n=64, seed=1)
    common = ["--data", str(data), "--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", device,
              "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--image-lr", "1e-3", "--tune-context",
              "--workers", "0", "--seed", "3", "--val-split", "0.25", "-q", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "numclip_cli", "train", *common, "--out", str(tmp_path / "ddp.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = subprocess.run([str(Path(sys.executable).parent / "numclip"), "train", *common,
                             "--out", str(tmp_path / "one.safetensors")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a = read_checkpoint(last_path(tmp_path / "ddp.safetensors")).tensors
    b = read_checkpoint(last_path(tmp_path / "one.safetensors")).tensors
    assert a.keys() == b.keys()
    return a, b, ddp.stdout


def write_distinct_pngs(folder: Path, count: int, blue: int = 90) -> list[str]:
    """``count`` tiny distinct PNGs in ``folder``; their paths in the order ``predict FOLDER`` visits them."""
    for i in range(count):
        Image.new("RGB", (16, 16), (i % 256, 7 * i % 256, blue)).save(folder / f"{i:03d}.png")
    return [str(folder / f"{i:03d}.png") for i in range(count)]


def jsonl(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines; every non-empty line must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_ok_record(record: dict[str, Any], path: str | None = None) -> None:
    """A complete ``status: ok`` record of the age task, self-consistent."""
    assert set(record) >= RECORD_FIELDS, record
    if path is not None:
        assert record["path"] == path
    assert record["status"] == "ok" and record["task"] == "age"
    assert list(record["probs"]) == AGE_BINS
    assert math.isclose(sum(record["probs"].values()), 1.0, abs_tol=1e-4)
    assert all(0 <= p <= 1 for p in record["probs"].values())
    assert 0 <= record["bin_index"] < len(AGE_BINS) and record["bin"] == AGE_BINS[record["bin_index"]]
    assert record["probs"][record["bin"]] == max(record["probs"].values())
    assert 0 <= record["value"] <= 100 and isinstance(record["value"], float)
    assert 0 <= record["expected_bin"] <= len(AGE_BINS) - 1


def assert_same_predictions(got: list[dict[str, Any]], want: list[dict[str, Any]], tol: float = 1e-3) -> None:
    """Same paths and statuses in the same order, and the same numbers within ``tol``."""
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["status"] == b["status"]
        if a["status"] == "ok":
            assert math.isclose(a["value"], b["value"], abs_tol=tol), (a, b)
            assert math.isclose(a["expected_bin"], b["expected_bin"], abs_tol=tol)
            for name in AGE_BINS:
                assert math.isclose(a["probs"][name], b["probs"][name], abs_tol=tol)


def one_error_line(stderr: str) -> str:
    """The single ``numclip: error:`` line of a failed run (no traceback, no "unexpected" exception)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("numclip: error:")]
    assert len(errors) == 1, stderr
    assert not errors[0].startswith("numclip: error: unexpected"), errors[0]  # a bug's catch-all message
    return errors[0]


# ------------------------------------------------------------------------------------------ image corpus

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
EXIF_ORIENTATION = 0x0112

# Upright (width, height) after load_rgb, for every file that must decode.
OK_SIZES: dict[str, tuple[int, int]] = {
    "rgba.png": (16, 16),
    "la.png": (16, 16),
    "p_transparency.png": (16, 16),
    "gray16.png": (16, 16),
    "int32.tiff": (16, 16),
    "float.tiff": (16, 16),
    "cmyk.jpg": (16, 16),
    "exif_rotated.jpg": (20, 40),  # stored 40x20 with Orientation=6 (rotate 90 degrees clockwise)
    "gray.png": (24, 12),
    "tiny.png": (1, 1),
    "animated.gif": (10, 10),
    "image.webp": (16, 16),
    "image.tiff": (16, 16),
    "image.bmp": (16, 16),
}
ERROR_NAMES = (
    "empty.jpg",
    "truncated.jpg",
    "text.jpg",
    "huge_header.png",  # 60000x60000: above twice Pillow's limit, Pillow itself refuses it
    "big_header.png",  # 10000x10000: between Pillow's warning and error, so load_rgb's own check refuses it
    "dir.jpg",
    "broken.jpg",
)
EXPECTED: dict[str, str] = {**dict.fromkeys(OK_SIZES, "ok"), **dict.fromkeys(ERROR_NAMES, "error")}


def make_corpus(dir: Path) -> dict[str, Path]:
    """Write every corpus file into ``dir`` (created if needed) and return name -> path."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    paths = {name: dir / name for name in EXPECTED}

    Image.new("RGBA", (16, 16), (*RED, 128)).save(paths["rgba.png"])  # 50% red: pink on white
    Image.new("LA", (16, 16), (0, 128)).save(paths["la.png"])  # 50% black: mid grey on white
    _save_palette_with_transparency(paths["p_transparency.png"])
    _halves("I;16", 65535, 100 * 257).save(paths["gray16.png"])  # -> 255 | 100
    _halves("I", 100_000, 50_000).save(paths["int32.tiff"])  # beyond 16 bits, scaled by max -> 255 | 128
    _halves("F", 1.0, 0.5).save(paths["float.tiff"])  # 0-1 floats -> 255 | 128
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(paths["cmyk.jpg"], quality=95)  # red
    _save_exif_rotated(paths["exif_rotated.jpg"])
    Image.new("L", (24, 12), 200).save(paths["gray.png"])
    Image.new("RGB", (1, 1), (10, 20, 30)).save(paths["tiny.png"])
    first, second = Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)
    first.save(paths["animated.gif"], save_all=True, append_images=[second], duration=100, loop=0)
    Image.new("RGB", (16, 16), GREEN).save(paths["image.webp"], lossless=True)
    Image.new("RGB", (16, 16), BLUE).save(paths["image.tiff"])
    Image.new("RGB", (16, 16), (10, 20, 30)).save(paths["image.bmp"])

    paths["empty.jpg"].write_bytes(b"")
    jpeg = encode(gradient(64, 64), "JPEG")
    paths["truncated.jpg"].write_bytes(jpeg[: len(jpeg) // 2])
    paths["text.jpg"].write_text("this is a text file, not a JPEG\n")
    paths["huge_header.png"].write_bytes(png_with_declared_size(60000, 60000))
    paths["big_header.png"].write_bytes(png_with_declared_size(10000, 10000))
    paths["dir.jpg"].mkdir(exist_ok=True)
    if paths["broken.jpg"].is_symlink():
        paths["broken.jpg"].unlink()
    os.symlink("missing-target.jpg", paths["broken.jpg"])
    return paths


def gradient(width: int, height: int) -> Image.Image:
    """A deterministic RGB test picture with detail in every channel (so encoders produce real data)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def encode(im: Image.Image, format: str, **options: object) -> bytes:
    """The bytes of ``im`` saved in ``format``."""
    buffer = io.BytesIO()
    im.save(buffer, format, **options)
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose IHDR declares width x height but whose IDAT is tiny."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # 8-bit RGB, deflate, adaptive filtering, no interlace.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _halves(mode: str, left: float, right: float) -> Image.Image:
    """A 16x16 single-channel image of ``mode``: left half ``left``, right half ``right``."""
    im = Image.new(mode, (16, 16), left)
    im.paste(right, (8, 0, 16, 16))
    return im


def _save_palette_with_transparency(path: Path) -> None:
    """P-mode PNG: left half palette index 0 (fully transparent red), right half index 1 (opaque green)."""
    im = Image.new("P", (16, 16), 0)
    im.putpalette([*RED, *GREEN])
    im.paste(1, (8, 0, 16, 16))
    im.save(path, transparency=0)


def _save_exif_rotated(path: Path) -> None:
    """JPEG stored 40x20 (left red, right blue) with EXIF Orientation=6: upright it is 20x40, red on top."""
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    im.save(path, exif=exif, quality=95)
