"""Shared CLI plumbing: the common model options, stderr reporting, and errors → exit codes in one place.

Only Typer and the standard library are imported at module level so ``numclip --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from numclip_cli.errors import NumclipError, one_line, visible
from numclip_cli.names import task_choices

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3  # usage errors exit 2: UsageError.exit_code
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

TaskOpt = Annotated[str | None, typer.Option(
    "--task", help=f"Built-in task ({task_choices()}) or a task spec file (.toml/.json).")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="A numclip .safetensors checkpoint; it carries its task, backbone and calibration.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="open_clip architecture (ViT-B-16, ...), numclip-tiny, hf-hub:ORG/REPO or local-dir:DIR.")]
PretrainedOpt = Annotated[str | None, typer.Option(
    "--pretrained", help="open_clip pretrained tag (openai, ...), a local weights file, or 'none' (random init).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (auto: CUDA if present).")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never touch the network (sets HF_HUB_OFFLINE=1).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
# Seeds feed torch's and numpy's generators, which take an int64 at most.
MAX_SEED = 2**63 - 1
# Decoding processes per CPU core at most: each is a forked process with its own memory, so an unbounded count
# forks until memory runs out (--workers 100000 had forked 700 processes holding 11 GB within 45 s).
WORKERS_PER_CORE = 4


def worker_count(value: int | None) -> int | None:
    """Option callback: at most ``WORKERS_PER_CORE`` decoding processes per CPU core of this machine."""
    limit = WORKERS_PER_CORE * (os.cpu_count() or 1)
    if value is not None and value > limit:
        raise typer.BadParameter(f"{value} is more than {limit} ({WORKERS_PER_CORE} per CPU core on this machine)")
    return value


WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=0, callback=worker_count, help="Decoding processes (default: 0 for a few images or on a CPU "
    "with 2 cores, 1 on a larger CPU, up to 4 feeding a GPU; at most 4 per CPU core).")]
CacheDirOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Where image features of a frozen image tower are cached between runs (default: the user "
                        "cache folder, ~/.cache/numclip/features on Linux).", show_default=False)]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the feature cache.")]
PrecisionOpt = Annotated[str | None, typer.Option(
    "--precision", help="fp32, amp (fp16 autocast), amp_bf16 (bf16 autocast), bf16 or fp16 (autocast, frozen "
                        "weights stored in that dtype), as open_clip names them; heads and losses stay fp32 "
                        "(default: amp on CUDA, else fp32).",
    show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More on stderr, tracebacks included.")]


def positive(value: float | None) -> float | None:
    """Option callback: a finite number above 0 (click's own ranges let NaN and inf through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above 0")
    return value


def non_negative(value: float | None) -> float | None:
    """Option callback: a finite number of at least 0 (click's ``min=0`` lets NaN and inf through)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value} is not a finite number of at least 0")
    return value


def fraction(value: float | None) -> float | None:
    """Option callback: a share strictly between 0 and 1."""
    if value is not None and not 0 < value < 1:  # False for NaN too
        raise typer.BadParameter(f"{value} is not between 0 and 1 (both excluded)")
    return value


def task_file(task: str | None) -> str | None:
    """The file a ``--task`` value names (a .toml or .json spec); None for a built-in task's name or no --task."""
    from numclip_cli.tasks import SPEC_SUFFIXES

    return task if task and Path(task).suffix.lower() in SPEC_SUFFIXES else None


def feature_cache_dir(cache_dir: Path | None, no_cache: bool) -> Path | None:
    """``--cache-dir`` / ``--no-cache`` → the feature cache's root folder (None: no cache)."""
    from numclip_cli.feature_cache import default_cache_dir

    return None if no_cache else cache_dir or default_cache_dir()


def cache_summary(cache) -> str:
    """One line on what the feature cache did this run."""
    damaged = f", {cache.rejected} damaged entr(ies) rebuilt" if cache.rejected else ""
    off = " (cannot write there: not stored)" if not cache.writable else ""
    return (f"feature cache {cache.folder}: {cache.hits} image(s) read, {cache.stored} encoded and stored"
            f"{damaged}{off}")


class Terminated(BaseException):
    """SIGTERM arrived; treated like Ctrl-C so finished work is kept."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


class Reporter:
    """Everything for people goes to stderr; stdout carries only results."""

    def __init__(self, quiet: bool = False, verbose: bool = False) -> None:
        from rich.console import Console

        self.quiet, self.verbose = quiet, verbose
        self.console = Console(stderr=True, highlight=False)

    @property
    def interactive(self) -> bool:
        """Whether a progress bar makes sense (stderr is a terminal and not quiet)."""
        return self.console.is_terminal and not self.quiet

    def info(self, message: str) -> None:
        """A normal status line (control characters in it, e.g. from a file name, shown as escapes)."""
        if not self.quiet:
            self.console.print(f"numclip: {visible(message)}", markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning (shown unless --quiet), control characters shown as escapes."""
        if not self.quiet:
            self.console.print(f"numclip: warning: {visible(message)}", markup=False, style="yellow", soft_wrap=True)

    def progress(self) -> Any:
        """A rich progress bar on stderr (disabled when stderr is not a terminal); transient: it is erased when its
        ``with`` block ends, so results printed to the same terminal afterwards start on a clean line."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                        console=self.console, disable=not self.interactive, transient=True)


def prepare(offline: bool, verbose: bool) -> None:
    """Process-wide settings before any heavy import: offline hub, quiet third-party logging, SIGTERM."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_VERBOSITY", "info" if verbose else "error")
    # open_clip logs to the root logger; what matters is repeated in our own words, so keep it for --verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL, format="%(name)s: %(message)s")
    with contextlib.suppress(ValueError):  # signal() only works in the main thread
        signal.signal(signal.SIGTERM, _raise_terminated)


def _stop_exception(signum: int) -> BaseException:
    """What a stop signal raises when it is not deferred."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


class StopRequest:
    """Which stop signal (SIGINT or SIGTERM) arrived during ``stop_at_safe_points``, if any."""

    signum: int | None = None

    def exception(self) -> BaseException | None:
        """What the signal raises when not deferred: KeyboardInterrupt or Terminated (None: no signal)."""
        return None if self.signum is None else _stop_exception(self.signum)


@contextlib.contextmanager
def stop_at_safe_points(quiet: bool = False) -> Iterator[StopRequest]:
    """While active, a first Ctrl-C or SIGTERM only sets ``request.signum``: the loop stops at its next safe point
    (never inside a half-written record, a file commit or a decode worker's hand-over of a batch, which would
    print the worker's traceback); a second one stops at once (KeyboardInterrupt / Terminated)."""
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise _stop_exception(signum)
        request.signum = signum
        if not quiet:  # os.write: a handler may run while sys.stderr is mid-write
            os.write(2, b"numclip: stopping after the current batch (signal again to stop at once)\n")

    previous = {}
    with contextlib.suppress(ValueError):  # signal() only works in the main thread
        previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def handle_errors(command: F) -> F:
    """Turn user errors into a one-line message and their exit code; tracebacks only with --verbose."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(kwargs.get("verbose"))
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except NumclipError as exc:
            if verbose:
                traceback.print_exc()
            print(f"numclip: error: {visible(str(exc))}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # the reader (head, jq -e ...) stopped reading: not an error of ours
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # left open: keeps interpreter shutdown from failing
            raise typer.Exit(EXIT_OK) from None
        except KeyboardInterrupt:
            print("numclip: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_SIGINT) from None
        except Terminated:
            print("numclip: terminated", file=sys.stderr)
            raise typer.Exit(EXIT_SIGTERM) from None
        except Exception as exc:  # a bug or an environment problem: still one line unless --verbose
            if verbose:
                traceback.print_exc()
            reason = visible(one_line(exc, limit=300))
            print(f"numclip: error: unexpected {type(exc).__name__}: {reason} (run with --verbose for details)",
                  file=sys.stderr)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper  # type: ignore[return-value]


def announce_device(spec: str, reporter: Reporter) -> Any:
    """Resolve ``--device`` once and say which device is used."""
    from numclip_cli.factory import resolve_device

    device = resolve_device(spec)
    reporter.info(f"device {device}")
    return device
