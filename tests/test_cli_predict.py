"""``numclip predict`` end to end: formats, input order, one record per input, exit codes, sharding, resuming.

Most runs go through ``CliRunner`` in-process (about a second each on the tiny model); a few run the installed
``numclip`` command in a real subprocess to check what pipelines see: stdout carries only results.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from helpers import (
    AGE_BINS,
    EXPECTED,
    MODEL,
    SUBPROCESS_TIMEOUT,
    assert_ok_record,
    assert_same_predictions,
    jsonl,
)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("numclip: error")]


@pytest.fixture(scope="module")
def baseline(run_cli, synthetic_dir: Path, synthetic_images: list[str]) -> list[dict[str, Any]]:
    """The default run over the synthetic folder: one batch, decoded in-process, JSON lines."""
    result = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "0", "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    return jsonl(result.stdout)


# --- formats -----------------------------------------------------------------------------------------------

def test_jsonl_has_one_complete_record_per_image(baseline, synthetic_images) -> None:
    assert [r["path"] for r in baseline] == synthetic_images
    for record, path in zip(baseline, synthetic_images, strict=True):
        assert_ok_record(record, path)


def test_default_format_off_a_terminal_is_jsonl_and_stderr_has_the_rest(run_cli, synthetic_images) -> None:
    result = run_cli(["predict", *synthetic_images[:2], *MODEL])
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in jsonl(result.stdout)] == synthetic_images[:2]
    assert "numclip: device cpu" in result.stderr
    assert "randomly initialised" in result.stderr  # --pretrained none warns
    assert "Traceback" not in result.stderr


def test_csv_has_a_header_and_a_probability_column_per_bin(run_cli, synthetic_dir: Path, baseline) -> None:
    pattern = str(synthetic_dir / "*" / "*.png")  # a glob: expanded by numclip, in sorted order
    result = run_cli(["predict", pattern, *MODEL, "--workers", "0", "--format", "csv"])
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    header = result.stdout.splitlines()[0].split(",")
    assert {"path", "status", "value", "bin", "bin_index", "expected_bin"} <= set(header)
    assert [f"p_{name}" for name in AGE_BINS] == [c for c in header if c.startswith("p_")]
    assert [row["path"] for row in rows] == [r["path"] for r in baseline]
    for row, record in zip(rows, baseline, strict=True):
        assert row["status"] == "ok" and row["bin"] == record["bin"]
        assert int(row["bin_index"]) == record["bin_index"]
        assert math.isclose(float(row["value"]), record["value"], abs_tol=1e-3)
        assert math.isclose(sum(float(row[f"p_{n}"]) for n in AGE_BINS), 1.0, abs_tol=1e-4)


def test_table_lists_every_path(run_cli, synthetic_dir: Path, synthetic_images, monkeypatch) -> None:
    monkeypatch.chdir(synthetic_dir)  # short relative paths fit the table's column unwrapped
    result = run_cli(["predict", ".", "--recursive", *MODEL, "--workers", "0", "--format", "table"])
    assert result.exit_code == 0, result.stderr
    for path in synthetic_images:
        assert os.path.join(".", os.path.relpath(path, synthetic_dir)) in result.stdout
    assert "value (years)" in result.stdout
    assert result.stdout.count("│ ok") == len(synthetic_images)


# --- inputs ------------------------------------------------------------------------------------------------

def test_stdin_paths_keep_their_order(run_cli, synthetic_images, baseline) -> None:
    shuffled = list(synthetic_images)
    random.Random(0).shuffle(shuffled)
    result = run_cli(["predict", "-", *MODEL, "--workers", "0"], input="\n".join(shuffled) + "\n")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == shuffled
    by_path = {r["path"]: r for r in baseline}
    assert_same_predictions(records, [by_path[p] for p in shuffled])


def test_null_separated_stdin(run_cli, synthetic_images, tmp_path: Path) -> None:
    odd = tmp_path / "new\nline and space.png"  # only --null can carry this name
    shutil.copy(synthetic_images[0], odd)
    paths = [synthetic_images[3], str(odd), synthetic_images[1]]
    result = run_cli(["predict", "-", "--null", *MODEL], input="\0".join(paths) + "\0")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == paths
    for record in records:
        assert_ok_record(record)


def test_one_record_per_input_including_broken_files(run_cli, corpus_dir: Path, tmp_path: Path) -> None:
    """Every corpus file that decodes is predicted (EXIF-rotated, 16-bit, CMYK, ...); every broken one is one
    error record with a one-line reason; small batches and decode workers mix the two in every way."""
    missing = str(tmp_path / "missing.jpg")
    args = ["predict", corpus_dir, missing, *MODEL, "--batch-size", "4", "--workers", "2"]
    result = run_cli(args)
    assert result.exit_code == 3, result.stderr
    records = jsonl(result.stdout)
    expected_paths = sorted(str(corpus_dir / name) for name in EXPECTED) + [missing]
    assert [r["path"] for r in records] == expected_paths
    for record in records:
        name = Path(record["path"]).name
        want = EXPECTED.get(name, "error")
        assert record["status"] == want, record
        if want == "ok":
            assert_ok_record(record)
        else:
            assert set(record) == {"path", "status", "error"}
            assert record["error"] and "\n" not in record["error"] and len(record["error"]) < 300
    assert "Traceback" not in result.stderr
    failed = sum(v == "error" for v in EXPECTED.values()) + 1
    assert f"{failed} of {len(records)}" in result.stderr


# --- exit codes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    ["--format", "xml"],
    ["--shard", "5/2"],
    ["--shard", "two"],
    ["--batch-size", "0"],
    ["--device", "quantum"],
    ["--skip-existing"],  # needs --output
])
def test_usage_errors_exit_2(run_cli, synthetic_images, extra: list[str]) -> None:
    result = run_cli(["predict", synthetic_images[0], *MODEL, *extra])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["--task", "--model"])
def test_missing_task_or_unknown_model_exit_2(run_cli, synthetic_images, bad: str) -> None:
    if bad == "--task":
        args = ["predict", synthetic_images[0], "--model", "numclip-tiny", "--pretrained", "none"]
    else:
        args = ["predict", synthetic_images[0], "--model", "no-such-model", "--pretrained", "none", "--task", "age"]
    result = run_cli(args)
    assert result.exit_code == 2, result.stderr
    assert len(error_lines(result.stderr)) == 1 and bad.lstrip("-") in error_lines(result.stderr)[0]


def test_no_inputs_exit_1(run_cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, stdin in ([[empty], None], [["-"], ""]):
        result = run_cli(["predict", *args, *MODEL], input=stdin)
        assert result.exit_code == 1, result.stderr
        assert result.stdout == "" and "no inputs" in result.stderr


def test_every_input_failed_exit_1(run_cli, corpus_dir: Path) -> None:
    # dir.jpg is left out: named on the command line, a directory means "the images inside it"
    broken = [str(corpus_dir / name) for name, want in EXPECTED.items() if want == "error" and name != "dir.jpg"]
    result = run_cli(["predict", *broken, *MODEL])
    assert result.exit_code == 1, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == broken
    assert all(r["status"] == "error" for r in records)


# --- output files ------------------------------------------------------------------------------------------

def test_output_file_is_written_atomically(run_cli, synthetic_dir: Path, baseline, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")
    result = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "0", "--output", out])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert jsonl(out.read_text()) == baseline
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_failed_run_leaves_no_output_file(run_cli, synthetic_images, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a checkpoint")
    out, kept = tmp_path / "out.jsonl", tmp_path / "kept.jsonl"
    kept.write_text("old\n")
    for target in (out, kept):
        result = run_cli(["predict", synthetic_images[0], "--checkpoint", bad, "--output", target])
        assert result.exit_code == 1, result.stderr
        assert len(error_lines(result.stderr)) == 1
    assert not out.exists()
    assert kept.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "kept.jsonl"]


def test_shards_cover_the_input_exactly_once(run_cli, synthetic_dir: Path, baseline) -> None:
    count = 3
    shards = []
    for index in range(count):
        result = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "0",
                          "--shard", f"{index}/{count}"])
        assert result.exit_code == 0, result.stderr
        shards.append(jsonl(result.stdout))
        assert_same_predictions(shards[-1], baseline[index::count])
    union = [r["path"] for shard in shards for r in shard]
    assert sorted(union) == sorted(r["path"] for r in baseline)
    assert len(union) == len(set(union)) == len(baseline)


def test_skip_existing_appends_only_missing_paths(run_cli, synthetic_dir: Path, synthetic_images, baseline,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = run_cli(["predict", *synthetic_images[:10], *MODEL, "--workers", "0", "--output", out])
    assert first.exit_code == 0, first.stderr
    head = out.read_text()
    with out.open("a") as handle:  # an interrupted write: half a record, no newline
        handle.write('{"path": "' + synthetic_images[10])
    again = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "0", "--output", out,
                     "--skip-existing"])
    assert again.exit_code == 0, again.stderr
    text = out.read_text()
    assert text.startswith(head)
    records = jsonl(text)
    paths = [r["path"] for r in records]
    assert paths == synthetic_images and len(set(paths)) == len(paths)
    assert_same_predictions(records, baseline)
    done = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--output", out, "--skip-existing"])
    assert done.exit_code == 0, done.stderr
    assert out.read_text() == text


# --- numerics do not depend on batching or decoding -----------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_does_not_change_predictions(run_cli, synthetic_dir: Path, baseline, batch_size: int) -> None:
    result = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "0",
                      "--batch-size", batch_size])
    assert result.exit_code == 0, result.stderr
    assert_same_predictions(jsonl(result.stdout), baseline)


def test_decode_workers_do_not_change_output(run_cli, synthetic_dir: Path, baseline) -> None:
    result = run_cli(["predict", synthetic_dir, "--recursive", *MODEL, "--workers", "2", "--batch-size", "8"])
    assert result.exit_code == 0, result.stderr
    assert_same_predictions(jsonl(result.stdout), baseline)


# --- the real command, as a pipeline runs it ----------------------------------------------------------------

@pytest.mark.slow
def test_real_process_writes_jsonl_to_a_pipe(numclip_bin: Path, synthetic_dir: Path, synthetic_images,
                                             clean_env) -> None:
    proc = subprocess.run(
        [str(numclip_bin), "predict", str(synthetic_dir), "--recursive", *MODEL, "--offline"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=clean_env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout: nothing but JSON lines
    assert [r["path"] for r in records] == synthetic_images
    for record in records:
        assert_ok_record(record)
    assert "numclip: device cpu" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stderr  # no colours off a terminal


@pytest.mark.slow
def test_real_process_reads_paths_from_stdin(numclip_bin: Path, synthetic_images, tmp_path: Path,
                                             clean_env) -> None:
    """``find ... | numclip predict -``: order kept; a FIFO among the inputs is an error record, not a hang."""
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    paths = [synthetic_images[5], str(fifo), synthetic_images[2], synthetic_images[0]]
    proc = subprocess.run([str(numclip_bin), "predict", "-", *MODEL, "--offline"], input="\n".join(paths) + "\n",
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=clean_env)
    assert proc.returncode == 3, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in records] == paths
    assert [r["status"] for r in records] == ["ok", "error", "ok", "ok"]
    assert records[1]["error"] == "not a regular file"


@pytest.mark.slow
def test_real_process_without_weights_offline_says_how_to_get_them(numclip_bin: Path, synthetic_images,
                                                                   clean_env) -> None:
    proc = subprocess.run([str(numclip_bin), "predict", synthetic_images[0], "--task", "age", "--offline"],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=clean_env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for words in ("--pretrained", "local-dir:", "cache", "--checkpoint"):
        assert words in errors[0], words


def _command_names() -> list[str]:
    from numclip_cli.cli.app import app

    group = typer.main.get_command(app)
    return group.list_commands(click.Context(group))


def test_every_subcommand_is_discovered() -> None:
    """The help tests below are parametrised over this list: it must hold every subcommand module in ``cli/``
    (the others are the app and its helpers)."""
    modules = {path.stem for path in (Path(__file__).parents[1] / "numclip_cli" / "cli").glob("*.py")}
    assert set(_command_names()) == modules - {"__init__", "app", "common", "table"}
    assert {"predict", "train", "calibrate", "synth", "tasks", "bench"} <= set(_command_names())


@pytest.mark.slow
@pytest.mark.parametrize("command", [[], *[[name] for name in _command_names()]], ids=lambda c: " ".join(c) or "root")
def test_help_exits_0(numclip_bin: Path, command: list[str], clean_env) -> None:
    proc = subprocess.run([str(numclip_bin), *command, "--help"], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, env=clean_env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "--help" in proc.stdout


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    """``numclip --help`` (and every subcommand's) must stay fast: torch and open_clip are not imported."""
    code = textwrap.dedent("""
        import sys
        import click, typer
        from typer.testing import CliRunner
        from numclip_cli.cli.app import app
        group = typer.main.get_command(app)
        for command in [[], *[[n] for n in group.list_commands(click.Context(group))]]:
            result = CliRunner().invoke(app, [*command, "--help"])
            assert result.exit_code == 0, (command, result.output)
        heavy = sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules)
        print("helps:", len(group.list_commands(click.Context(group))) + 1, "heavy:", heavy)
        sys.exit(1 if heavy else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["helps:", str(len(_command_names()) + 1), "heavy:", "[]"]  # root + every command
