"""The ``numclip`` Typer application: one module per subcommand, heavy imports deferred until a command runs."""

from __future__ import annotations

import os
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
    app()
