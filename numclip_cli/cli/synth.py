"""``numclip synth``: write a synthetic ordinal dataset (folder per label + task.toml) for demos and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from numclip_cli.cli.common import QuietOpt, Reporter, VerboseOpt, handle_errors


@handle_errors
def synth(
    kind: Annotated[str, typer.Argument(help="Generator: dots (count), fill (bar level) or size (square size).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (one sub-folder per label).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed; image i depends only on (seed, i).")] = 0,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 64,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate synthetic images whose label is a countable or measurable number."""
    from numclip_cli.synthetic import write_dataset

    spec = write_dataset(kind, out, n=n, seed=seed, size=size)
    Reporter(quiet, verbose).info(f"wrote {n} {kind} images to {out} (task spec {spec})")
