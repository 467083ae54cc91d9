"""The ``numclip`` Typer application: one module per subcommand, heavy imports deferred until a command runs."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

import typer

from numclip_cli import __version__
from numclip_cli.cli.bench import bench
from numclip_cli.cli.calibrate import calibrate
from numclip_cli.cli.common import EXIT_SIGINT, EXIT_SIGTERM, Terminated
from numclip_cli.cli.predict import predict
from numclip_cli.cli.synth import synth
from numclip_cli.cli.tasks import tasks
from numclip_cli.cli.train import train

# libgomp's default busy-waiting makes torch 4-7x slower whenever other processes (or our own decode workers) want
# the same cores (measured on a shared 2-core machine: README, Performance); it is read when torch loads, so here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="numclip",
    help="Teach CLIP to predict ordered numbers (age, decade, aesthetics grade) from images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help: rich's option panels cut long option names at 80 columns and show "<bool>" on flags
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _summary(command: Callable[..., None]) -> str:
    """A command's one-line docstring without its example, for the command list (click would cut it at "e.g.")."""
    return (command.__doc__ or "").strip().splitlines()[0].split(" (e.g.")[0].rstrip(".") + "."


for _command in (predict, train, calibrate, synth, tasks, bench):
    app.command(short_help=_summary(_command))(_command)


def _version(value: bool) -> None:
    if value:
        print(f"numclip {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """numclip: ordinal regression with CLIP, for shell pipelines."""


def main() -> None:
    """Console-script entry point.

    Once the command has returned (files committed, decode workers stopped) and its output is flushed, the process
    ends with ``os._exit``: the interpreter's teardown of torch and open_clip took ~1 s of a ~5 s cold
    ``numclip predict`` (docs/performance.md) and runs nothing of numclip's. From that moment a Ctrl-C or SIGTERM
    also ends the process at once with the same code: a signal during interpreter shutdown would otherwise print
    Python's "Exception ignored in ..." traceback.
    """
    code: int | None = None
    try:  # a further stop signal may land anywhere once the command has finished: at worst it sets the code
        try:
            app()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = EXIT_SIGINT if code is None else code
    except Terminated:
        code = EXIT_SIGTERM if code is None else code

    def exit_now(signum: int, frame: object) -> None:
        os._exit(code)

    for signum in (signal.SIGINT, signal.SIGTERM):
        while True:  # a signal that lands while the handler is being installed raises here: install it again
            try:
                signal.signal(signum, exit_now)
                break
            except (KeyboardInterrupt, Terminated):
                continue
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader that went away (BrokenPipe) changes nothing now
            stream.flush()
    os._exit(code)
