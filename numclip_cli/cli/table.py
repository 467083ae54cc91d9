"""The table ``numclip predict`` prints for people at a terminal (``--format table``), rendered with rich."""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from numclip_cli.errors import visible
from numclip_cli.inputs import record_path
from numclip_cli.writers import JsonlWriter, make_writer


class TableWriter(JsonlWriter):
    """A rich table for people at a terminal, rendered when the run ends.

    A value that lies in another bin than the most probable one is marked, and a footnote names that bin.
    Text from files (names, error reasons, a task's bin names) goes in as ``rich.text.Text``, never as markup, so
    ``[bold]x.png`` stays those characters; control characters are shown as escapes (see ``visible``).
    """

    def __init__(self, stream: IO[str], unit: str) -> None:
        super().__init__(stream)
        self.table = Table(show_header=True, header_style="bold")
        for column, justify in (("path", "left"), (f"value ({unit})" if unit else "value", "right"),
                                ("bin", "left"), ("p(bin)", "right"), ("status", "left")):
            self.table.add_column(column, justify=justify, overflow="fold")

    def write(self, record: dict[str, Any]) -> None:
        """Add one row."""
        path = Text(visible(record_path(record["path"])["path"]))
        if record["status"] != "ok":
            status = Text.assemble((record["status"], "red"), ": ", visible(record.get("error", "")))
            self.table.add_row(path, "", "", "", status)
            return
        value = f"{record['value']:.2f}"
        if record["value_bin"] != record["bin"]:
            value += f" ({visible(record['value_bin'])})†"
            self.table.caption = "† the value lies in the bin in brackets, not in the most probable bin"
        if "interval" in record:
            low, high = record["interval"]
            value += f"  [{low:.1f}, {high:.1f}]"
        self.table.add_row(path, Text(value), Text(visible(record["bin"])), f"{record['probs'][record['bin']]:.2f}",
                           "ok")

    def close(self) -> None:
        """Render the table."""
        console = Console(file=self.stream, soft_wrap=False)
        if not console.is_terminal:
            console.width = 1000  # a file or pipe has no width: never wrap paths mid-name, the table stays natural
        console.print(self.table)
        self.flush()


def writer_for(fmt: str, stream: IO[str], bin_names: list[str], unit: str) -> JsonlWriter:
    """The writer of ``--format fmt``: this table, or a machine-readable one (``writers.make_writer``)."""
    return TableWriter(stream, unit) if fmt == "table" else make_writer(fmt, stream, bin_names)
