"""What a person at a terminal sees: the progress display is gone before the results table prints, and ``--help``
is legible at 80 columns (option names uncut, boolean flags without a value type).

The progress test runs the real ``numclip`` on a pseudo-terminal and replays its output on a tiny screen model
(cursor moves, line erases, wrapping at the terminal width), so it checks the screen a user ends up with.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import MODEL, SUBPROCESS_TIMEOUT
from typer.testing import CliRunner

from numclip_cli.cli.app import app

WIDTH = 80
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b[()][A-Za-z0-9]|\x1b.")


def screen(output: str, width: int = WIDTH) -> list[str]:
    """The lines left on a ``width``-column terminal after it has shown ``output`` (a minimal VT100 model)."""
    lines: list[list[str]] = [[]]
    row = col = 0
    pos = 0
    while pos < len(output):
        match = CSI.match(output, pos)
        if match:
            pos = match.end()
            params, command = match.group(1) or "", match.group(2)
            count = int(params) if params.isdigit() else 1
            if command == "A":
                row = max(0, row - count)
            elif command == "B":
                row += count
            elif command == "C":
                col += count
            elif command == "D":
                col = max(0, col - count)
            elif command == "K":  # rich erases whole lines (2K); treat every erase as that
                lines[row] = []
            while len(lines) <= row:
                lines.append([])
            continue
        char = output[pos]
        pos += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
        elif char >= " ":
            if col >= width:  # the terminal wraps onto the next line
                row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
        while len(lines) <= row:
            lines.append([])
    return ["".join(line).rstrip() for line in lines]


def run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float = SUBPROCESS_TIMEOUT) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on one pseudo-terminal of WIDTH columns; return its exit code and output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, WIDTH, 0, 0))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture
def terminal_env(clean_env: dict[str, str]) -> dict[str, str]:
    env = dict(clean_env, TERM="xterm-256color", COLUMNS=str(WIDTH), LINES="40")
    env.pop("NO_COLOR", None)
    return env


def test_progress_is_gone_before_the_table_prints(numclip_bin: Path, synthetic_dir: Path, terminal_env) -> None:
    code, output = run_on_a_terminal([str(numclip_bin), "predict", str(synthetic_dir), "--recursive", *MODEL,
                                      "--workers", "0", "--batch-size", "4", "--format", "table"], terminal_env)
    assert code == 0, output
    lines = screen(output)
    tops = [i for i, line in enumerate(lines) if "┏" in line]
    assert len(tops) == 1, "\n".join(lines)
    top = lines[tops[0]]
    assert top.lstrip().startswith("┏") and "predict" not in top and "/24" not in top, "\n".join(lines)
    # transient: no progress text is left anywhere on the screen
    assert not any("24/24" in line or "predict ━" in line for line in lines), "\n".join(lines)
    assert sum("synthetic" in line or ".png" in line for line in lines) >= 24


def test_screen_model_wraps_and_erases() -> None:
    """The screen model itself: a wrapped long line, an erased line, a cursor move up."""
    assert screen("x" * 85 + "\n", width=80) == ["x" * 80, "x" * 5, ""]
    assert screen("bar 1/3\r\x1b[2Kdone\n") == ["done", ""]
    assert screen("one\ntwo\x1b[1A\r\x1b[2Knew") == ["new", "two"]


def commands() -> list[tuple[str, Any]]:
    """The app's root command (named "") and every subcommand, by name."""
    group = typer.main.get_command(app)
    return [("", group), *sorted(group.commands.items())]


def help_text(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    result = CliRunner().invoke(app, [*([name] if name else []), "--help"], terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", [name for name, _ in commands()])
def test_help_at_80_columns_shows_every_option_uncut(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = help_text(name, monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    assert "…" not in text, text
    words = set(re.findall(r"(?<![\w-])--?[\w][\w-]*", text))
    command = dict(commands())[name]
    for param in command.params:
        for opt in [*param.opts, *param.secondary_opts]:
            if opt.startswith("-"):
                assert opt in words, f"{opt} missing or cut in:\n{text}"


@pytest.mark.parametrize("name", [name for name, _ in commands()])
def test_boolean_flags_show_no_value_type(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = help_text(name, monkeypatch)
    assert "<bool>" not in text and "BOOLEAN" not in text, text
    flags = [p for p in dict(commands())[name].params if getattr(p, "is_flag", False)]
    assert flags, "every command has --help at least"
    for flag in flags:
        line = next(line for line in text.splitlines() if re.search(rf"(?<![\w-]){re.escape(flag.opts[-1])}\b", line))
        assert "<" not in re.split(r"\s{2,}", line.strip())[0], line  # the option column shows no metavar


def test_help_shows_no_markup_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, _ in commands():
        assert "\\[" not in help_text(name, monkeypatch)
