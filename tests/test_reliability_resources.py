"""Running out of room: a batch too big for device memory is split with a warning instead of crashing, and a full
disk while writing predictions or checkpoints is a one-line error that leaves the previous file intact.

Out-of-memory is simulated on the CPU (``torch.OutOfMemoryError``, the class CUDA raises, exists on every build)
and a full disk with writes / fsyncs that raise ``ENOSPC``, after part of the data reached the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import MODEL, TINY, assert_same_predictions, jsonl, one_error_line

from numclip_cli.model.methods import OrdinalModel
from numclip_cli.writers import JsonlWriter

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder: Path) -> list[str]:
    """Temp files an atomic write left behind (there must be none)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- device memory -----------------------------------------------------------------------------------------

def fits_at_most(limit: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the image tower raise out-of-memory for batches above ``limit``; returns the batch sizes tried."""
    tried: list[int] = []
    encode = OrdinalModel.encode_images

    def encode_or_oom(self: OrdinalModel, images: torch.Tensor) -> torch.Tensor:
        tried.append(len(images))
        if len(images) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return encode(self, images)

    monkeypatch.setattr(OrdinalModel, "encode_images", encode_or_oom)
    return tried


def test_a_batch_too_big_for_memory_is_halved_with_a_warning(run_cli, synthetic_dir: Path, synthetic_images,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "0", "--batch-size", "24"]
    plain = run_cli(args)
    assert plain.exit_code == 0, plain.stderr
    tried = fits_at_most(5, monkeypatch)
    result = run_cli(args)
    assert result.exit_code == 0, result.stderr
    assert tried == [24, 12, 6] + [3] * 8  # halved until it fits, then kept small
    warnings = re.findall(r"out of cpu memory with (\d+) images per batch: continuing with (\d+)", result.stderr)
    assert warnings == [("24", "12"), ("12", "6"), ("6", "3")]
    assert "--batch-size 3" in result.stderr and "Traceback" not in result.stderr
    assert_same_predictions(jsonl(result.stdout), jsonl(plain.stdout))


def test_one_image_that_does_not_fit_is_a_clear_error(run_cli, synthetic_images,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fits_at_most(0, monkeypatch)
    result = run_cli(["predict", *synthetic_images[:2], *MODEL, "--workers", "0"])
    assert result.exit_code == 1, result.stderr
    assert "out of cpu memory even for one image" in one_error_line(result.stderr)


# --- disk full ---------------------------------------------------------------------------------------------

def disk_fills_at(record_number: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``record_number``-th record gets half-way to the file, then the disk is full."""
    write = JsonlWriter.write
    count = 0

    def write_until_full(self: JsonlWriter, record: dict) -> None:
        nonlocal count
        count += 1
        if count == record_number:
            self.stream.write(json.dumps(record)[:25])
            self.stream.flush()
            raise ENOSPC
        write(self, record)

    monkeypatch.setattr(JsonlWriter, "write", write_until_full)


def fsync_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step of an atomic write (some filesystems only report a full disk here) fails."""
    def no_space(fd: int) -> None:
        raise ENOSPC

    monkeypatch.setattr(os, "fsync", no_space)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_while_writing_predictions_keeps_the_previous_file(where: str, run_cli, synthetic_images,
                                                                     tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "previous run"}\n')
    if where == "write":
        disk_fills_at(3, monkeypatch)
    else:
        fsync_fails(monkeypatch)
    result = run_cli(["predict", *synthetic_images[:6], *MODEL, "--workers", "0", "--output", out])
    assert result.exit_code == 1, result.stderr
    assert one_error_line(result.stderr) == (f"numclip: error: no space left while writing {out} "
                                             f"(No space left on device); the previous out.jsonl is intact")
    assert out.read_text() == '{"path": "previous run"}\n'
    assert leftovers(tmp_path) == []


def test_disk_full_while_appending_keeps_complete_records(run_cli, synthetic_images, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.jsonl"
    base = [*MODEL, "--workers", "0", "--output", out]
    first = run_cli(["predict", *synthetic_images[:4], *base])
    assert first.exit_code == 0, first.stderr
    disk_fills_at(3, monkeypatch)
    result = run_cli(["predict", *synthetic_images[:10], *base, "--skip-existing"])
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    assert f"no space left while adding to {out}" in error and "rerun with --skip-existing" in error
    text = out.read_text()
    assert text.endswith("\n")  # the half-written record is cut off
    assert [r["path"] for r in jsonl(text)] == synthetic_images[:6]
    monkeypatch.undo()
    again = run_cli(["predict", *synthetic_images[:10], *base, "--skip-existing"])
    assert again.exit_code == 0, again.stderr
    assert [r["path"] for r in jsonl(out.read_text())] == synthetic_images[:10]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(run_cli, synthetic_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the previous checkpoint")
    fsync_fails(monkeypatch)
    result = run_cli(["train", "--data", synthetic_dir, "--model", TINY, "--pretrained", "none", "--epochs", "1",
                      "--batch-size", "8", "--workers", "0", "--out", out])
    assert result.exit_code == 1, result.stderr
    assert one_error_line(result.stderr) == (f"numclip: error: no space left while writing {out} "
                                             f"(No space left on device); the previous model.safetensors is intact")
    assert out.read_bytes() == b"the previous checkpoint"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("where", ["--output", "stdout"])
def test_a_full_device_or_standard_output_is_named_in_one_line(where: str, numclip_bin: Path, clean_env,
                                                               synthetic_images, tmp_path: Path) -> None:
    """Written in place (no temp file, no previous file to keep): /dev/full always answers ENOSPC."""
    command = [numclip_bin, "predict", *synthetic_images[:2], *MODEL, "--workers", "0", "--format", "jsonl"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(command + (["--output", "/dev/full"] if where == "--output" else []), env=clean_env,
                              stdout=full if where == "stdout" else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    shown = "/dev/full" if where == "--output" else "standard output"
    assert done.returncode == 1, done.stderr
    assert one_error_line(done.stderr) == (f"numclip: error: no space left while writing {shown} "
                                           "(No space left on device)")
