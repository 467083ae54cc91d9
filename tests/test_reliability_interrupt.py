"""Interruptions lose no finished work: Ctrl-C / SIGTERM to the whole process group during ``predict --output``, a
decode worker that dies, and SIGKILL during ``train``; each run then resumes to a complete result.

The signal tests run the installed ``numclip`` in a new session and signal its process group, as a terminal's
Ctrl-C does (the DataLoader's decode workers get the signal too).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import MODEL, SUBPROCESS_TIMEOUT, TINY, jsonl, one_error_line, write_distinct_pngs

from numclip_cli.cli.common import Terminated, stop_at_safe_points
from numclip_cli.decoding import ImageFiles

MANY = 400  # with --batch-size 8 a run takes 50 batches: a signal always lands mid-run


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A folder of tiny distinct PNGs and their paths in the order ``predict FOLDER`` visits them."""
    folder = tmp_path_factory.mktemp("many")
    return folder, write_distinct_pngs(folder, MANY, blue=40)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = SUBPROCESS_TIMEOUT) -> None:
    """Poll until ``condition()`` holds; fail if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def temp_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def assert_complete_records(out: Path, paths: list[str]) -> list[dict]:
    """Only whole, valid JSON records, for a prefix of ``paths`` (input order)."""
    text = out.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    records = jsonl(text)  # every line parses
    assert [r["path"] for r in records] == paths[: len(records)]
    assert all(r["status"] == "ok" for r in records)
    return records


def resume(run_cli, folder: Path, out: Path, paths: list[str]) -> None:
    """``--skip-existing`` appends the rest: every input exactly once, the earlier records untouched."""
    before = out.read_text(encoding="utf-8")
    result = run_cli(["predict", folder, *MODEL, "--workers", "0", "--batch-size", "64", "--output", out,
                      "--skip-existing"])
    assert result.exit_code == 0, result.stderr
    assert out.read_text(encoding="utf-8").startswith(before)
    assert len(assert_complete_records(out, paths)) == len(paths)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_group_signal_during_predict_keeps_complete_records(signum: int, code: int, numclip_bin: Path, many_images,
                                                            tmp_path: Path, clean_env, run_cli) -> None:
    folder, paths = many_images
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [str(numclip_bin), "predict", str(folder), *MODEL, "--batch-size", "8", "--workers", "2", "--output",
         str(out), "--offline"], env=clean_env, start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # records reach the temp file beside out.jsonl batch by batch; it is renamed when the run ends
        wait_for(lambda: any(p.stat().st_size for p in temp_files(out)), proc)
        os.killpg(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert "stopped after" in stderr and "--skip-existing" in stderr
    assert temp_files(out) == []
    assert 0 < len(assert_complete_records(out, paths)) < MANY
    resume(run_cli, folder, out, paths)


@pytest.mark.slow
def test_a_dead_decode_worker_keeps_complete_records(many_images, tmp_path: Path, run_cli,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed outright (the OOM killer, a crashing decoder) makes the DataLoader raise in the main
    process: the run stops like an interrupt, keeps what it finished and says so in one line."""
    folder, paths = many_images
    out = tmp_path / "out.jsonl"
    main_pid, decode = os.getpid(), ImageFiles.__getitem__

    def dies_at_100(self: ImageFiles, index: int):
        if index == 100 and os.getpid() != main_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(self, index)

    monkeypatch.setattr(ImageFiles, "__getitem__", dies_at_100)
    result = run_cli(["predict", folder, *MODEL, "--batch-size", "8", "--workers", "2", "--output", out])
    assert multiprocessing.active_children() == []  # the other worker was shut down, not left for exit time
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    assert "decoding worker process died" in error and "--workers 0" in error
    assert temp_files(out) == []
    assert 0 < len(assert_complete_records(out, paths)) <= 100
    monkeypatch.undo()
    resume(run_cli, folder, out, paths)


def test_first_signal_waits_for_a_safe_point_and_a_second_stops_at_once() -> None:
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_at_safe_points(quiet=True) as stop:
        assert stop.signum is None and stop.exception() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs; nothing is raised
        assert stop.signum == signal.SIGTERM and isinstance(stop.exception(), Terminated)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


@pytest.mark.slow
def test_sigkill_during_train_leaves_a_resumable_checkpoint(numclip_bin: Path, tmp_path: Path, clean_env,
                                                            run_cli) -> None:
    from numclip_cli.checkpoint import read_checkpoint
    from numclip_cli.factory import create_model_and_transforms
    from numclip_cli.synthetic import write_dataset
    from numclip_cli.trainer import last_path

    data = write_dataset("dots", tmp_path / "dots", n=120, seed=0).parent
    out = tmp_path / "model.safetensors"
    args = ["train", "--data", str(data), "--model", TINY, "--pretrained", "none", "--epochs", "3",
            "--batch-size", "16", "--lr", "3e-3", "--workers", "0", "--out", str(out), "--offline"]
    proc = subprocess.Popen([str(numclip_bin), *args], env=clean_env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(SUBPROCESS_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:  # the epoch line comes after that epoch's checkpoints are written
            seen.append(line)
            if line.startswith("numclip: epoch 1/3:"):
                os.killpg(proc.pid, signal.SIGKILL)  # mid-epoch 2
                break
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    last = read_checkpoint(last_path(out))
    assert last.resume["epoch"] == 1 and len(last.resume["history"]) == 1
    create_model_and_transforms(checkpoint=out)  # the best checkpoint (epoch 1) loads as a model
    result = run_cli(args[:-1] + ["--resume"])  # in-process: no second start-up
    assert result.exit_code == 0, result.stderr
    assert "resuming after epoch 1 of 3" in result.stderr
    final = read_checkpoint(last_path(out))
    assert final.resume["epoch"] == 3 and [h["epoch"] for h in final.resume["history"]] == [1, 2, 3]
