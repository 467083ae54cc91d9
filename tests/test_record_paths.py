"""File names that are not valid UTF-8: every input keeps its record, with a lossless, documented path encoding.

A record's ``path`` is always valid UTF-8 (undecodable bytes shown as U+FFFD); ``path_bytes`` (base64 of the
name's bytes) is added only for such names, and ``--skip-existing`` matches it back to the input.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import subprocess_env
from helpers import MODEL, assert_ok_record
from hypothesis import given, settings
from hypothesis import strategies as st

from numclip_cli.inputs import path_from_record, record_path

RAW_NAMES = [b"\xff\xfe-latin.png", b"caf\xe9.png", b"ok.png", "ünïcödé.png".encode()]
ARGS = [*MODEL, "--faces", "none", "--workers", "0"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(min_size=1, max_size=40).filter(lambda name: b"\0" not in name))
def test_record_path_round_trips_any_name(name: bytes) -> None:
    path = os.fsdecode(name)
    fields = json.loads(json.dumps(record_path(path), ensure_ascii=False).encode("utf-8"))  # valid UTF-8 JSON
    assert path_from_record(fields) == path and os.fsencode(path_from_record(fields)) == name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        assert fields == {"path": name.decode("utf-8", "replace"), "path_bytes": base64.b64encode(name).decode()}
    else:
        assert fields == {"path": text}  # ordinary names: no new field


def test_malformed_path_bytes_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad path_bytes"):
        path_from_record({"path": "x", "path_bytes": "not base64!"})


@pytest.fixture
def raw_folder(tmp_path: Path, synthetic_images: list[str]) -> Path:
    """Copies of one image under names that are (and are not) valid UTF-8."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in RAW_NAMES:
        shutil.copy(synthetic_images[0], os.path.join(os.fsencode(folder), name))
    return folder


def assert_records_name_every_file(records: list[dict], folder: Path) -> None:
    """One ok record per file, whose path fields lead back to the exact bytes of its name."""
    assert len(records) == len(RAW_NAMES)
    names = [os.fsencode(path_from_record(r)) for r in records]
    assert sorted(names) == sorted(os.path.join(os.fsencode(folder), n) for n in RAW_NAMES)
    for record, name in zip(records, names, strict=True):
        assert record["status"] == "ok", record
        assert bool(record.get("path_bytes")) == (not _is_utf8(name))
        assert record["path"] == name.decode("utf-8", "replace")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_jsonl_output_keeps_every_input_and_skip_existing_matches_them(run_cli, raw_folder: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = run_cli(["predict", raw_folder, *ARGS, "-o", out])
    assert result.exit_code == 0, result.stderr
    text = out.read_bytes().decode("utf-8")  # strictly valid UTF-8
    records = [json.loads(line) for line in text.splitlines()]
    assert_records_name_every_file(records, raw_folder)
    for record in records:
        assert_ok_record(record)
    again = run_cli(["predict", raw_folder, *ARGS, "-o", out, "--skip-existing"])
    assert again.exit_code == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert out.read_bytes().decode("utf-8") == text  # nothing predicted twice


def test_csv_output_has_a_path_bytes_column(run_cli, raw_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = run_cli(["predict", raw_folder, *ARGS, "-o", out])
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))
    assert list(rows[0])[-1] == "path_bytes"  # the new column comes last: no other column moves
    assert_records_name_every_file([{k: v for k, v in row.items() if v != ""} for row in rows], raw_folder)


def test_table_shows_the_readable_form(run_cli, raw_folder: Path) -> None:
    result = run_cli(["predict", raw_folder, *ARGS, "--format", "table"])
    assert result.exit_code == 0, result.stderr
    assert "\ufffd\ufffd-latin.png" in result.stdout and "caf\ufffd.png" in result.stdout


@pytest.mark.slow  # ~15 s on a busy 2-core box (torch import)
def test_a_real_process_with_strict_utf8_streams_reads_and_writes_raw_names(numclip_bin: Path, raw_folder: Path,
                                                                           tmp_path: Path) -> None:
    """Paths on stdin as raw bytes; stdout and stdin strict UTF-8 (as in a UTF-8 desktop locale)."""
    paths = b"".join(os.path.join(os.fsencode(raw_folder), name) + b"\n" for name in RAW_NAMES)
    env = {**subprocess_env(tmp_path), "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run([str(numclip_bin), "predict", "-", *ARGS, "--format", "jsonl"], input=paths,
                          capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    records = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert_records_name_every_file(records, raw_folder)
    assert [os.fsencode(path_from_record(r)) for r in records] == paths.splitlines()  # input order
