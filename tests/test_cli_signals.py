"""Signals that keep coming while ``numclip`` shuts down: stderr stays one line per event, never a traceback.

A first signal stops ``predict`` at its next batch; the test then keeps signalling every few milliseconds until the
process is gone, so some signals land after the command has returned, during interpreter shutdown (atexit
handlers, module teardown), where Python would print "Exception ignored in ..." with a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import MODEL, SUBPROCESS_TIMEOUT, write_distinct_pngs

IMAGES = 400  # with --batch-size 8: 50 batches, so the first signal lands mid-run


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    write_distinct_pngs(folder, IMAGES, blue=40)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signals_during_shutdown_print_no_traceback(signum: int, code: int, numclip_bin: Path, many: Path,
                                                    tmp_path: Path, clean_env) -> None:
    out = tmp_path / "out" / "out.jsonl"
    out.parent.mkdir()
    proc = subprocess.Popen([str(numclip_bin), "predict", str(many), *MODEL, "--workers", "0", "--batch-size", "8",
                             "--output", str(out)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=clean_env, start_new_session=True)
    watchdog = threading.Timer(SUBPROCESS_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        # the first records are in the output's temp file (not the lock file, which holds the pid at once)
        while not any(p.stat().st_size for p in out.parent.iterdir() if p.name.endswith(".tmp")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        os.kill(proc.pid, signum)
        lines = [proc.stderr.readline()]
        while "stopped after" not in lines[-1]:  # the command is finishing: from now on, keep signalling
            assert lines[-1], "".join(lines)
            lines.append(proc.stderr.readline())
        sent = 0
        while proc.poll() is None:
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                break
            sent += 1
            time.sleep(0.003)
        stderr = "".join(lines) + proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sent > 0
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert proc.returncode == code, stderr
