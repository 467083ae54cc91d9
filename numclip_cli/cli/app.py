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
    """Console-script entry point."""
    try:
        app()  # standalone mode: always ends in SystemExit with the command's exit code
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        _exit_on_signal(code)
        raise


def _exit_on_signal(code: int) -> None:
    """From here on a Ctrl-C or SIGTERM ends the process at once with ``code``: the command has finished and said
    what it had to say in one line; a signal during interpreter shutdown would otherwise print Python's
    "Exception ignored in ..." traceback (or wait for the shutdown to finish)."""

    def exit_now(signum: int, frame: object) -> None:
        os._exit(code)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, exit_now)
    for stream in (sys.stdout, sys.stderr):  # os._exit skips this: flush now, with the handlers in place
        with contextlib.suppress(Exception):
            stream.flush()
