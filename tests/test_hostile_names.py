"""File names that attack the output formats: a CR that would split a CSV row, rich markup and terminal escape
sequences that would reach the screen through ``--format table``."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from helpers import AGE_BINS, MODEL
from rich.console import Console

from numclip_cli.cli.table import TableWriter
from numclip_cli.writers import CsvWriter

ARGS = [*MODEL, "--faces", "none", "--workers", "0"]
CSV_NAMES = ["cr\rname.png", "lf\nname.png", "crlf\r\nname.png", 'quote",comma.png', "plain.png"]
TABLE_NAMES = ["[bold]x.png", "[link=https://evil.example]y.png[/link]", "esc\x1b[31mred.png",
               "title\x1b]0;pwned\x07.png", "bell\x07back\x08.png", "cr\roverwrite.png", "rtl\u202egnp.exe"]


def ok_record(path: str, bin_name: str = AGE_BINS[0]) -> dict:
    probs = {name: 0.2 for name in AGE_BINS}
    return {"path": path, "status": "ok", "task": "age", "value": 1.0, "bin": bin_name,
            "value_bin": bin_name, "bin_index": AGE_BINS.index(bin_name) if bin_name in AGE_BINS else 0, "probs": probs,
            "expected_bin": 0.0}


def test_csv_rows_round_trip_whatever_the_name(tmp_path: Path) -> None:
    stream = io.StringIO(newline="")
    writer = CsvWriter(stream, AGE_BINS)
    for name in CSV_NAMES:
        writer.write(ok_record(name))
    writer.write({"path": "err\r.png", "status": "error", "error": "bad\rreason"})
    rows = list(csv.reader(io.StringIO(stream.getvalue(), newline="")))
    assert len(rows) == 1 + len(CSV_NAMES) + 1  # a header and exactly one row per record
    header = rows[0]
    by_column = [dict(zip(header, row, strict=True)) for row in rows[1:]]
    assert [row["path"] for row in by_column] == [*CSV_NAMES, "err\r.png"]
    assert by_column[-1]["error"] == "bad\rreason"
    assert "\nplain.png,ok,age," in stream.getvalue()  # ordinary rows are not quoted


def test_csv_output_of_a_real_run_keeps_one_row_per_file(run_cli, tmp_path: Path, synthetic_images: list[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in CSV_NAMES:
        shutil.copy(synthetic_images[0], folder / name)
    out = tmp_path / "out.csv"
    result = run_cli(["predict", folder, *ARGS, "-o", out])
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))
    assert sorted(row["path"] for row in rows) == sorted(str(folder / name) for name in CSV_NAMES)
    assert {row["status"] for row in rows} == {"ok"}


def render(writer: TableWriter) -> str:
    """The writer's table as a colour terminal would receive it."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system="truecolor")
    console.print(writer.table)
    return console.file.getvalue()


def table_of(records: list[dict]) -> str:
    writer = TableWriter(io.StringIO(), "years")
    for record in records:
        writer.write(record)
    return render(writer)


def test_table_shows_names_as_text_not_markup_or_terminal_codes() -> None:
    output = table_of([ok_record(name) for name in TABLE_NAMES])
    plain = table_of([ok_record(f"name{i}.png") for i in range(len(TABLE_NAMES))])
    # only rich's own styling reaches the terminal: as many ESC as for harmless names, no BEL, BS, CR, bidi
    assert output.count("\x1b") == plain.count("\x1b")
    for char in "\x07\x08\r\u202e":
        assert char not in output
    assert "\x1b]8;" not in output  # no hyperlink (OSC 8) was made from [link=...]
    for shown in ["[bold]x.png", "[link=https://evil.example]y.png[/link]", r"esc\x1b[31mred.png",
                  r"title\x1b]0;pwned\x07.png", r"bell\x07back\x08.png", r"cr\roverwrite.png", r"rtl\u202egnp.exe"]:
        assert shown in output, shown


@pytest.mark.parametrize("field", ["error", "bin"])
def test_table_escapes_error_reasons_and_bin_names(field: str) -> None:
    """Error reasons and bin names come from files too (exception text, a user's task spec)."""
    hostile = "[bold]\x1b[2Jwiped"
    if field == "error":
        record = {"path": "a.png", "status": "error", "error": hostile}
    else:
        record = ok_record("a.png", bin_name=hostile)
        record["probs"] = {hostile: 1.0}
    output = table_of([record])
    assert r"[bold]\x1b[2Jwiped" in output and "\x1b[2J" not in output


STDERR_NAMES = ["esc\x1b[31mred", "title\x1b]0;pwned\x07", "clear\x1b[2J", "rtl\u202egnp", "cr\roverwrite"]


@pytest.mark.parametrize("name", STDERR_NAMES)
def test_a_path_named_in_an_error_reaches_the_terminal_as_escapes(run_cli, tmp_path: Path, name: str) -> None:
    from numclip_cli.errors import visible

    result = run_cli(["train", "--data", tmp_path / name, "--model", "numclip-tiny", "--pretrained", "none",
                      "--offline", "--device", "cpu"])
    assert result.exit_code != 0
    assert f"{visible(str(tmp_path / name))}" in result.stderr  # still named, so the user can find it
    assert not any(ch in result.stderr for ch in "\x1b\x07\r\u202e")


@pytest.mark.parametrize("name", STDERR_NAMES)
def test_status_lines_and_warnings_show_control_characters_as_escapes(capsys, name: str) -> None:
    from numclip_cli.cli.common import Reporter

    reporter = Reporter()
    reporter.info(f"reading {name}")
    reporter.warn(f"skipped {name}")
    err = capsys.readouterr().err
    assert not any(ch in err for ch in "\x1b\x07\r\u202e") and err.count("\\") >= 2
