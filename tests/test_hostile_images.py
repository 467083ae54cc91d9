"""Images whose shape, not their pixel count, would make preprocessing explode: strips of 600000x1 pixels.

The decompression-bomb guard bounds the decoded pixels; a model transform that resizes the short side first
then upscales a 1-pixel strip to a 600000-times-wider intermediate. ``load_rgb`` keeps the centre part of at most
``MAX_ASPECT_RATIO``:1, which the tests check is both bounded (a real process under an address-space limit) and
invisible for ordinary images (identical tensors).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, subprocess_env
from PIL import Image

from numclip_cli.decoding import ImageFiles
from numclip_cli.images import MAX_ASPECT_RATIO, load_rgb

ADDRESS_SPACE = 4 << 30  # torch's import alone maps ~3.5 GB of address space
# A tiny-model predict run peaks at ~0.95 GB RSS on CPU (measured); the 600000x1 strip before the fix needed
# 600000*64 x 64 RGB pixels (7.4 GB) for numclip-tiny's 64-pixel input.
PEAK_RSS_BOUND = 1536 << 20
TIMEOUT = 180  # seconds; a normal run of two images takes ~10 s on a busy 2-core box


def grey_png(width: int, height: int, grey: int = 128) -> bytes:
    """An 8-bit greyscale PNG written chunk by chunk: a strip of any length costs a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compress = zlib.compressobj(9)
    row = b"\x00" + bytes([grey]) * width  # filter type 0, then the row's pixels
    idat = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def run_limited(command: list[str], env: dict[str, str], report: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``command`` under an address-space limit in a fresh parent; return it and the child's peak RSS in bytes.

    The extra parent makes ``RUSAGE_CHILDREN`` the peak of this one command, not of every child the test
    process ever waited for.
    """
    wrapper = textwrap.dedent(f"""
        import json, resource, subprocess, sys
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE}))
        code = subprocess.run(sys.argv[2:], preexec_fn=limit).returncode
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        with open(sys.argv[1], "w") as handle:
            json.dump(peak, handle)
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", wrapper, str(report), *command], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    return proc, json.loads(report.read_text())


def test_extreme_strips_predict_in_bounded_memory_and_time(numclip_bin: Path, tmp_path: Path) -> None:
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    wide.write_bytes(grey_png(600_000, 1))
    tall.write_bytes(grey_png(1, 600_000))
    assert wide.stat().st_size < 1000  # the whole attack is a few hundred bytes
    command = [str(numclip_bin), "predict", str(wide), str(tall), "--model", TINY, "--pretrained", "none",
               "--task", "age", "--faces", "none", "--workers", "0", "--format", "jsonl"]
    start = time.monotonic()
    proc, peak = run_limited(command, subprocess_env(tmp_path), tmp_path / "peak.json")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["path"], r["status"]) for r in records] == [(str(wide), "ok"), (str(tall), "ok")], records
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak >> 20} MiB"
    assert seconds < TIMEOUT


def test_a_strip_keeps_the_centre_the_model_transform_sees(tiny_backbone, tmp_path: Path) -> None:
    """Cutting a 200:1 strip to 20:1 changes no pixel of what the transform (resize short side, centre crop) gives."""
    pixels = np.random.default_rng(0).integers(0, 256, (10, 2000, 3), dtype=np.uint8)
    full = Image.fromarray(pixels)
    for image in (full, full.transpose(Image.Transpose.TRANSPOSE)):
        path = tmp_path / "strip.png"
        image.save(path)
        loaded = load_rgb(path)
        short = min(image.size)
        assert sorted(loaded.size) == [short, short * MAX_ASPECT_RATIO]
        assert torch.equal(tiny_backbone.preprocess(loaded), tiny_backbone.preprocess(image))


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (333, 17), (17, 333), (200, 10), (10, 200), (1, 1)])
def test_ordinary_aspect_ratios_give_the_same_tensor_as_before(tiny_backbone, tmp_path: Path,
                                                               size: tuple[int, int]) -> None:
    """Up to and including MAX_ASPECT_RATIO:1 (200x10 is exactly 20:1) the image reaches the transform whole."""
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    loaded = load_rgb(path)
    assert loaded.size == size
    with Image.open(path) as plain:
        assert torch.equal(tiny_backbone.preprocess(loaded), tiny_backbone.preprocess(plain.convert("RGB")))


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(""), ValueError("  \n ")])
def test_a_transform_error_without_message_is_named_by_its_type(tmp_path: Path, exc: Exception) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(path)

    def failing(image: Image.Image) -> torch.Tensor:
        raise exc

    _, tensor, error, _ = ImageFiles([str(path)], failing)[0]
    assert tensor is None
    assert error == f"cannot preprocess image: {type(exc).__name__}"
