"""``numclip synth``: write a synthetic ordinal dataset (folder per label + task.toml) for demos and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from numclip_cli.cli.common import MAX_SEED, QuietOpt, Reporter, VerboseOpt, handle_errors


@handle_errors
def synth(
    kind: Annotated[str, typer.Argument(
        help="Generator: dots (count), fill (bar level), size (square size) or photo (haze level on real "
             "photographs; needs numclip[photos]).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (one sub-folder per label).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, max=MAX_SEED, help="Seed; image i depends only on (seed, split, i).")] = 0,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 64,
    split: Annotated[str, typer.Option("--split", help=(
        "train or test; they never share an image (photo: not even a photograph; the photographs of each "
        "split are listed in numclip_cli/photo_suite.py)."))] = "train",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate ordinal images whose label is a countable or measurable number (a folder per label)."""
    from numclip_cli.synthetic import write_dataset

    spec = write_dataset(kind, out, n=n, seed=seed, size=size, split=split)
    Reporter(quiet, verbose).info(f"wrote {n} {kind} images ({split} split) to {out} (task spec {spec})")
