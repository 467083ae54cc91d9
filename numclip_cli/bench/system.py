"""The machine and its processes: device and CPU name, versions, this process's memory, a timed child process."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from typing import Any

import torch

from numclip_cli import __version__
from numclip_cli.errors import NumclipError


def environment(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured: device, CPU count, threads and versions."""
    import open_clip

    return {"device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "numclip": __version__,
            "platform": platform.platform()}


def device_name(device: torch.device) -> str:
    """The GPU's name, else the CPU model (``platform`` only knows the architecture on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux), else its peak so far, in MB."""
    rss = _proc_status_mb("self", "VmRSS")
    return peak_rss_mb() if rss is None else rss


def _proc_status_mb(pid: int | str, field: str) -> float | None:
    """A memory field of ``/proc/PID/status`` (VmRSS, VmHWM) in MB; None without one (not Linux, process gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_process(command: list[str]) -> tuple[float, float, float]:
    """Seconds from starting ``command`` to its first stdout line and to its exit; its peak RSS in MB (0: unknown)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    # The child's own high-water mark, read while it lives: its rusage (wait4, RUSAGE_CHILDREN, psutil alike)
    # starts from the pages of this large process it was forked from, which exec carries into ru_maxrss.
    peak, done = [0.0], threading.Event()
    watcher = threading.Thread(target=_watch_peak_rss, args=(process.pid, peak, done), daemon=True)
    watcher.start()
    first = process.stdout.readline()
    first_seconds = time.perf_counter() - start
    process.stdout.read()
    done.set()
    watcher.join()
    process.stdout.close()
    if process.wait() != 0 or not first:
        raise NumclipError(f"cold-start run failed (exit {process.returncode}): {' '.join(command)}")
    return first_seconds, time.perf_counter() - start, peak[0]


def _watch_peak_rss(pid: int, peak: list[float], done: threading.Event) -> None:
    """Keep ``peak[0]`` at the process's high-water RSS until ``done`` is set."""
    while True:
        peak[0] = max(peak[0], _proc_status_mb(pid, "VmHWM") or 0.0)
        if done.wait(0.02):
            return
