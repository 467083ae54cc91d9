"""``numclip tasks``: list the built-in tasks, or show one spec."""

from __future__ import annotations

from typing import Annotated

import typer

from numclip_cli.cli.common import handle_errors


@handle_errors
def tasks(
    name: Annotated[str | None, typer.Argument(help="A built-in task or spec file to show in full.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors.")] = False,
) -> None:
    """List the built-in tasks and their bins (or validate and show one spec)."""
    from rich.console import Console
    from rich.table import Table

    from numclip_cli.tasks import get_task, list_tasks

    table = Table("task", "unit", "prompt", "bins")
    for spec in [get_task(name)] if name else [get_task(n) for n in list_tasks()]:
        bins = ", ".join(f"{b.name} ({b.low:g}–{b.high:g})" for b in spec.bins)
        table.add_row(spec.name, spec.unit, spec.prompt, bins)
    Console().print(table)
