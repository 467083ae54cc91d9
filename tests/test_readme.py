"""The README's commands run as written: every code block marked ``<!-- runnable -->`` runs offline with bash.

Each block runs in its own empty folder that looks like a fresh clone after its first ``make demo`` install: the
repository's ``Makefile``, ``pyproject.toml`` and ``weights/`` (linked), and a ``.venv`` whose ``bin/`` holds this
environment's ``numclip`` and ``python`` with the Makefile's install stamp, so ``make demo`` runs its commands
without installing anything. In a ``console`` block whose lines start with ``$ ``, only those lines are commands.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- runnable -->"
EXEMPT = "<!-- not runnable from a test:"  # followed by the reason, e.g. the block runs this test suite itself
FENCE = re.compile(r"^```(console|bash|sh)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
BLOCK_TIMEOUT = 600


def code_blocks(text: str) -> list[tuple[int, bool, str]]:
    """Every console/bash block as (line number, marked runnable, commands)."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        body = match.group(2)
        prompts = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        blocks.append((text.count("\n", 0, match.start()) + 1, before.strip() == MARKER,
                       "\n".join(prompts) if prompts else body))
    return blocks


def runnable_blocks() -> list[tuple[int, str]]:
    return [(line, commands) for line, marked, commands in code_blocks(README.read_text(encoding="utf-8")) if marked]


def test_block_extraction() -> None:
    text = f"# t\n{MARKER}\n```console\n$ echo a   # note\nout\n$ echo b\n```\n\n```bash\necho c\n```\n"
    assert code_blocks(text) == [(3, True, "echo a   # note\necho b"), (9, False, "echo c\n")]


def test_every_block_before_the_command_reference_is_runnable() -> None:
    """The top section and the quick start: what a newcomer types first must work as written."""
    text = README.read_text(encoding="utf-8")
    top = text[: text.index("\n## Commands")]
    blocks = code_blocks(top)
    assert blocks, "the README's top section shows no commands"
    unmarked = [line for line, marked, _ in blocks if not marked and not exempt(top, line)]
    assert not unmarked, f"README blocks at lines {unmarked} are neither runnable nor exempt with a reason"


def exempt(text: str, line: int) -> bool:
    """Whether the block starting at ``line`` follows an ``EXEMPT`` comment that gives a reason."""
    before = text.split("\n")[line - 2].strip()
    return before.startswith(EXEMPT) and before.endswith("-->") and len(before) > len(EXEMPT) + 10


def fresh_clone(folder: Path) -> None:
    """What a clone looks like after ``make demo`` installed ``.venv``, without installing anything."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, folder / name)
    (folder / "weights").symlink_to(ROOT / "weights", target_is_directory=True)
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("numclip", "python"):
        (bin_dir / tool).symlink_to(Path(sys.executable).parent / tool)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    # the Makefile's install stamp, newer than pyproject.toml: make sees an up-to-date .venv
    digest = hashlib.sha1((folder / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (folder / ".venv" / f".numclip-{digest}").touch()


@pytest.mark.slow
@pytest.mark.parametrize("line, commands", runnable_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs_as_written(line: int, commands: str, tmp_path: Path, clean_env: dict[str, str]) -> None:
    assert shutil.which("jq") or "jq" not in commands, "the README pipes into jq: install it (apt-get install jq)"
    clone = tmp_path / "numclip"
    clone.mkdir()
    fresh_clone(clone)
    env = dict(clean_env, PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    # under `make test` the outer make's variables (VENV=... from .ci/run) reach an inner `make` through these:
    # the block must see a fresh clone's defaults, or its `make demo` would reinstall the outer venv from here
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VENV"):
        env.pop(name, None)
    # -e: stop at the first failing command; pipefail: a failing numclip before "| jq" fails the block too
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", commands], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"README.md:{line} failed with exit code {proc.returncode}:\n{output}"
    assert "Traceback" not in proc.stderr, proc.stderr
