"""Task specs and data lists that are not small regular files: FIFOs, endless devices, huge files, directories.

Anything that could hang or exhaust memory runs in a real ``numclip`` process with a timeout and an address-space
limit, so a regression fails the test instead of hanging or killing the test run.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env

from numclip_cli.errors import DataError, NumclipError, TaskSpecError
from numclip_cli.textfiles import MAX_DATA_LIST_BYTES, MAX_TASK_SPEC_BYTES, read_text_file

TIMEOUT = 90  # seconds: a train command imports torch before it reads its data (~10 s on a busy box)
ADDRESS_SPACE = 4 << 30


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_numclip(numclip_bin: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """A real ``numclip`` run, bounded in time and memory; a hang is a test failure (TimeoutExpired)."""
    return subprocess.run([str(numclip_bin), *args], env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=limited, stdin=subprocess.DEVNULL)


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that sees this package, bounded in time and memory (no torch: fast)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          preexec_fn=limited, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def hostile_file(tmp_path: Path, kind: str, name: str, oversize: int) -> Path:
    """A file named ``name`` that is a FIFO with no writer, a link to /dev/zero, a directory, or ``oversize`` bytes."""
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:  # a sparse file: its size is real, its disk use is not
        with path.open("wb") as handle:
            handle.truncate(oversize)
    return path


EXPECTED = {"fifo": "is a FIFO (named pipe), not a regular file",
            "dev-zero": "is a character device, not a regular file",
            "directory": "is a directory, not a regular file", "huge": "is too large"}


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("numclip: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_task_spec_must_be_a_small_regular_file(numclip_bin: Path, tmp_path: Path, kind: str) -> None:
    spec = hostile_file(tmp_path, kind, "spec.toml", MAX_TASK_SPEC_BYTES + 1)
    proc = run_numclip(numclip_bin, ["tasks", str(spec)], tmp_path)
    assert proc.returncode == 2, proc.stderr  # a bad --task is a usage error
    line = error_line(proc.stderr)
    assert f"task spec {spec} {EXPECTED[kind]}" in line, line


def train_args(synthetic_dir: Path, tmp_path: Path, option: str, listing: Path) -> list[str]:
    """A tiny training command whose --data or --val is ``listing``."""
    data = ["--data", str(listing)] if option == "--data" else ["--data", str(synthetic_dir), "--val", str(listing)]
    return ["train", *data, "--task", str(synthetic_dir / "task.toml"), "--model", "numclip-tiny",
            "--pretrained", "none", "--epochs", "1", "--out", str(tmp_path / "m.safetensors")]


@pytest.mark.slow  # ~15 s each on a busy 2-core box: train imports torch before it reads its data
@pytest.mark.parametrize(("option", "kind", "suffix"), [("--data", "fifo", ".csv"), ("--val", "dev-zero", ".txt")])
def test_data_list_that_could_hang_or_never_end_is_refused(numclip_bin: Path, synthetic_dir: Path, tmp_path: Path,
                                                           option: str, kind: str, suffix: str) -> None:
    listing = hostile_file(tmp_path, kind, f"list{suffix}", 0)
    proc = run_numclip(numclip_bin, train_args(synthetic_dir, tmp_path, option, listing), tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert f"data list {listing} {EXPECTED[kind]}" in line, line
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(("option", "suffix"), [("--data", ".tsv"), ("--val", ".csv"), ("--data", ".txt")])
def test_oversized_data_list_is_refused_before_reading(run_cli, synthetic_dir: Path, tmp_path: Path, option: str,
                                                       suffix: str) -> None:
    listing = hostile_file(tmp_path, "huge", f"list{suffix}", MAX_DATA_LIST_BYTES + 1)
    result = run_cli(train_args(synthetic_dir, tmp_path, option, listing))
    assert result.exit_code == 1, result.stderr
    line = error_line(result.stderr)
    assert f"data list {listing} is too large ({MAX_DATA_LIST_BYTES + 1:,} bytes; the limit is " in line, line


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_the_reader_refuses_what_could_hang_or_never_end(tmp_path: Path, kind: str) -> None:
    """read_text_file itself, in a child bounded in time and memory (it imports no torch: fast)."""
    path = hostile_file(tmp_path, kind, "list.tsv", 0)
    proc = run_python(f"""
        from numclip_cli.errors import DataError
        from numclip_cli.textfiles import read_text_file
        try:
            read_text_file({str(path)!r}, 1 << 20, "data list", DataError)
        except DataError as exc:
            print(exc)
    """)
    assert proc.stdout.strip() == f"data list {path} {EXPECTED[kind]}", proc.stderr


def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path: Path) -> None:
    """The stat says regular file, the open finds a FIFO: O_NONBLOCK keeps open from waiting for a writer."""
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    proc = run_python(f"""
        import os, stat
        from numclip_cli import textfiles
        from numclip_cli.errors import TaskSpecError
        real_stat = os.stat
        def regular(path, *args, **kwargs):  # the FIFO appears between the look and the open
            st = list(real_stat(path, *args, **kwargs))
            st[0] = stat.S_IFREG | 0o644
            return os.stat_result(st)
        textfiles.os.stat = regular
        try:
            textfiles.read_text_file({str(fifo)!r}, 100, "task spec", TaskSpecError)
        except TaskSpecError as exc:
            print(exc)
    """)
    assert proc.stdout.strip() == f"task spec {fifo} is a FIFO (named pipe), not a regular file", proc.stderr


def test_a_file_at_the_limit_is_read_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"a" * 97)  # a BOM is dropped
    assert read_text_file(path, 100, "data list", DataError) == "a" * 97
    path.write_bytes(b"a" * 101)
    with pytest.raises(DataError, match=r"data list .* is too large \(101 bytes; the limit is 100\)"):
        read_text_file(path, 100, "data list", DataError)


def test_a_file_that_grows_after_the_size_check_is_still_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import numclip_cli.textfiles as textfiles

    path = tmp_path / "list.txt"
    path.write_bytes(b"small")
    real_fstat = os.fstat

    def grow_then_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        path.write_bytes(b"x" * 1000)  # the file grows between the size checks and the read
        return st

    monkeypatch.setattr(textfiles.os, "fstat", grow_then_fstat)
    with pytest.raises(DataError, match="too large"):
        read_text_file(path, 100, "data list", DataError)


def test_missing_unreadable_and_binary_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError, match=r"^task spec not found: .*missing\.toml$"):
        read_text_file(tmp_path / "missing.toml", 100, "task spec", TaskSpecError)
    binary = tmp_path / "spec.toml"
    binary.write_bytes(b"name = \xff\xfe")
    with pytest.raises(TaskSpecError, match=r"is not UTF-8 text \(invalid byte at offset 7\)"):
        read_text_file(binary, 100, "task spec", TaskSpecError)
    with pytest.raises(NumclipError, match="NUL byte"):
        read_text_file("a\0b.toml", 100, "task spec")


def test_a_file_without_read_permission_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated (root may read any file): the open is refused after the stat passed."""
    import numclip_cli.textfiles as textfiles

    path = tmp_path / "spec.toml"
    path.write_text("name = 'x'\n")

    def denied(*args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(textfiles.os, "open", denied)
    with pytest.raises(TaskSpecError, match=r"^cannot read task spec .*spec\.toml: Permission denied$"):
        read_text_file(path, 100, "task spec", TaskSpecError)


def test_readers_use_the_bounded_reader(tmp_path: Path, synthetic_dir: Path) -> None:
    """get_task and load_samples go through read_text_file with their own limits and error types."""
    from numclip_cli.datasets import load_samples
    from numclip_cli.tasks import get_task

    spec = tmp_path / "big.toml"
    shutil.copy(synthetic_dir / "task.toml", spec)
    with spec.open("a") as handle:
        handle.write("#" * MAX_TASK_SPEC_BYTES + "\n")
    with pytest.raises(TaskSpecError, match="is too large"):
        get_task(str(spec))
    listing = tmp_path / "list.csv"
    with listing.open("wb") as handle:
        handle.truncate(MAX_DATA_LIST_BYTES + 1)
    with pytest.raises(DataError, match="is too large"):
        load_samples(listing, get_task(str(synthetic_dir / "task.toml")))
