"""No output may be a file the same command reads: an image, the checkpoint, a data list or a task spec given
as ``--output``/``--out``/``--json``/``--metrics-out`` (under any name: a link counts) is refused with exit 2
before any work, and the input is left as it was. An existing file that is not an input is still replaced."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from numclip_cli.synthetic import write_dataset

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "numclip-tiny-dots.safetensors"
TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu"]


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """A dots dataset folder (with its task.toml), a CSV list of it, and a copy of the shipped checkpoint."""
    data = tmp_path / "dots"
    write_dataset("dots", data, n=12, seed=5)
    images = sorted(data.rglob("*.png"))
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(DEMO, checkpoint)
    return {"data": data, "image": images[0], "list": listing, "checkpoint": checkpoint, "spec": data / "task.toml"}


def _refused(result, target: Path, before: bytes) -> None:
    assert result.exit_code == 2, result.output
    assert "would destroy what this command reads" in result.stderr
    assert target.read_bytes() == before


@pytest.mark.parametrize("victim", ["image", "checkpoint", "alias"])
def test_predict_refuses_to_write_over_an_input(run_cli, setup: dict[str, Path], tmp_path: Path, victim: str) -> None:
    target = setup["checkpoint" if victim == "checkpoint" else "image"]
    before = target.read_bytes()
    output = target
    if victim == "alias":  # another name of the same file
        output = tmp_path / "other-name.jsonl"
        os.link(target, output)
    result = run_cli(["predict", setup["image"], "--checkpoint", setup["checkpoint"], "--offline",
                      "--device", "cpu", "--format", "jsonl", "--output", output])
    _refused(result, target, before)


def test_predict_still_replaces_an_existing_file_that_is_no_input(run_cli, setup: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    output = tmp_path / "old.jsonl"
    output.write_text("old\n")
    result = run_cli(["predict", setup["image"], "--checkpoint", setup["checkpoint"], "--offline",
                      "--device", "cpu", "--format", "jsonl", "--output", output])
    assert result.exit_code == 0, result.output
    assert output.read_text().startswith('{"path"')


@pytest.mark.parametrize(("option", "victim"), [("--metrics-out", "spec"), ("--out", "list"),
                                                ("--metrics-out", "image")])
def test_train_refuses_to_write_over_an_input(run_cli, setup: dict[str, Path], tmp_path: Path, option: str,
                                              victim: str) -> None:
    data = setup["list"] if victim == "list" else setup["data"]
    target = setup[victim]
    before = target.read_bytes()
    outputs = {"--out": tmp_path / "m.safetensors", "--metrics-out": tmp_path / "m.json", option: target}
    result = run_cli(["train", "--data", data, "--task", setup["spec"], *TINY, "--epochs", "1",
                      *(part for pair in outputs.items() for part in pair)])
    _refused(result, target, before)


@pytest.mark.parametrize("victim", ["list", "checkpoint"])
def test_calibrate_refuses_to_write_over_an_input(run_cli, setup: dict[str, Path], tmp_path: Path,
                                                  victim: str) -> None:
    target = setup[victim]
    before = target.read_bytes()
    result = run_cli(["calibrate", "--checkpoint", setup["checkpoint"], "--data", setup["list"], "--offline",
                      "--device", "cpu", "--out", tmp_path / "calibrated.safetensors", "--json", target])
    _refused(result, target, before)


def test_bench_checks_its_report_before_the_bench_runs(run_cli, setup: dict[str, Path], tmp_path: Path) -> None:
    target = setup["checkpoint"]
    before = target.read_bytes()
    base = ["bench", "--suite", "speed", "--quick", "--model", "numclip-tiny", "--device", "cpu", "--offline"]
    _refused(run_cli([*base, "--checkpoint", target, "--json", target]), target, before)
    missing = run_cli([*base, "--json", tmp_path / "no" / "such" / "report.json"])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
