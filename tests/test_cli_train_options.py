"""``numclip train`` options and messages: hyperparameters checked at parse time, a diverged run said plainly
(never another run's metrics, never a claim that a file was written), defaults that fit the run, and warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from numclip_cli.synthetic import write_dataset

TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def fill(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 "fill level" images: 36 train, 4 validation with the default split."""
    root = tmp_path_factory.mktemp("fill")
    write_dataset("fill", root, n=40, seed=1)
    return root


@pytest.mark.parametrize("option, value", [
    ("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--image-lr", "-1"), ("--image-lr", "nan"),
    ("--image-lr", "-inf"), ("--val-split", "0"), ("--val-split", "1"), ("--val-split", "1.5"),
    ("--val-split", "-0.1"), ("--val-split", "nan")])
def test_bad_hyperparameters_are_usage_errors_before_any_work(run_cli, tmp_path: Path, option: str,
                                                              value: str) -> None:
    # the data folder does not exist: a check that ran after parsing would exit 1 ("dataset not found")
    result = run_cli(["train", "--data", tmp_path / "missing", *TINY, option, value])
    assert result.exit_code == 2, result.output
    assert option in result.stderr and "Traceback" not in result.stderr


def test_a_run_without_a_finite_validation_score_says_so_and_keeps_the_old_file(run_cli, fill: Path,
                                                                                  tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier run's checkpoint")
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "1", "--batch-size", "64", "--tune-context",
                      "--lr", "1e30", "--image-lr", "1e30", "--out", out])  # finite, but diverges at once
    assert result.exit_code == 1, result.output
    assert "no epoch reached a finite validation MAE" in result.stderr
    assert f"{out} was not written" in result.stderr
    assert out.read_bytes() == b"an earlier run's checkpoint"
    assert result.stdout == ""  # no metrics table: neither this run's nor the old file's
    assert "best epoch" not in result.output
