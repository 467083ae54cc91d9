"""``numclip train`` options and messages: hyperparameters checked at parse time, a diverged run said plainly
(never another run's metrics, never a claim that a file was written), defaults that fit the run, and warnings."""

from __future__ import annotations

import math
import os
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


@pytest.mark.parametrize("command", [["train", "--data", "missing"], ["predict", "missing.png"],
                                     ["calibrate", "--checkpoint", "missing.safetensors", "--data", "missing"]])
def test_workers_beyond_four_per_core_are_refused_before_any_work(run_cli, command: list[str]) -> None:
    """--workers 100000 once forked processes until memory ran out; now it is a usage error naming the limit."""
    result = run_cli([*command, "--workers", "100000"])
    assert result.exit_code == 2, result.output
    assert f"more than {4 * (os.cpu_count() or 1)}" in result.stderr


def test_coop_with_everything_frozen_is_a_usage_error_and_writes_nothing(run_cli, fill: Path,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = run_cli(["train", "--data", fill, *TINY, "--method", "coop", "--freeze-context", "--freeze-image",
                      "--epochs", "1", "--out", out])
    assert result.exit_code == 2, result.output
    assert "has nothing left to train" in result.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_the_largest_seed_help_allows_trains(run_cli, fill: Path, tmp_path: Path) -> None:
    """Seeds derived from --seed (per epoch, per image) stay within torch's int64 for every allowed --seed."""
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "1", "--batch-size", "16", "--seed",
                      str(2**63 - 1), "--out", tmp_path / "m.safetensors"])
    assert result.exit_code == 0, result.stderr


def test_a_run_without_a_finite_validation_score_says_so_and_keeps_the_old_file(run_cli, fill: Path,
                                                                                  tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier run's checkpoint")
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "1", "--batch-size", "64", "--tune-context",
                      "--lr", "1e30", "--image-lr", "1e30", "--out", out])  # finite, but diverges at once
    assert result.exit_code == 1, result.output
    assert "no epoch reached a finite validation mae" in result.stderr
    assert f"{out} was not written" in result.stderr
    assert out.read_bytes() == b"an earlier run's checkpoint"
    assert result.stdout == ""  # no metrics table: neither this run's nor the old file's
    assert "best epoch -1" not in result.output and "→" not in result.output


def test_a_loss_that_turns_nan_stops_the_run_before_it_touches_the_saved_epochs(run_cli, fill: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    from numclip_cli.checkpoint import read_checkpoint
    from numclip_cli.model.methods import NumClip
    from numclip_cli.trainer import Trainer, last_path

    epoch_now = {}
    real_epoch, real_loss = Trainer.train_epoch, NumClip.loss

    def train_epoch(self, samples, epoch, on_step):
        epoch_now["epoch"] = epoch
        return real_epoch(self, samples, epoch, on_step)

    def loss(self, out, values, bins):
        losses = real_loss(self, out, values, bins)
        return {**losses, "total": losses["total"] * math.nan} if epoch_now["epoch"] == 1 else losses

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(NumClip, "loss", loss)
    out = tmp_path / "model.safetensors"
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "3", "--batch-size", "16", "--out", out])
    assert result.exit_code == 1, result.output
    error = " ".join(result.stderr.split())
    assert "the training loss became nan at epoch 2, step 1" in error and "Traceback" not in error
    assert f"{out} keeps epoch 1, the best so far, and {last_path(out)} epoch 1" in error
    for path in (out, last_path(out)):  # both still hold epoch 1's finite weights
        ckpt = read_checkpoint(path)
        assert ckpt.train["epoch"] == 1
        assert all(bool(t.isfinite().all()) for t in ckpt.tensors.values() if t.is_floating_point())
    assert read_checkpoint(last_path(out)).resume["epoch"] == 1


def test_help_shows_defaults_that_fit_the_run(run_cli) -> None:
    text = " ".join(run_cli(["train", "--help"]).stdout.split())
    assert "auto: after 60 % and 85 %" in text and "[default: auto]" in text and "[default: 60]" not in text
    assert "default: 0.003 from random init, else 1e-05" in text
    assert "[default: 2" not in text  # --workers follows predict's rule


@pytest.mark.parametrize("value", ["0", "-3", "two", "", ","])
def test_bad_milestones_are_usage_errors_before_any_work(run_cli, tmp_path: Path, value: str) -> None:
    result = run_cli(["train", "--data", tmp_path / "missing", *TINY, "--milestones", value])
    assert result.exit_code == 2, result.output
    assert "--milestones" in result.stderr


def test_defaults_follow_the_backbone_and_the_epochs(run_cli, fill: Path, tmp_path: Path) -> None:
    from numclip_cli.checkpoint import read_checkpoint
    from numclip_cli.decoding import default_workers

    out = tmp_path / "m.safetensors"
    args = [a for a in TINY if a not in ("--workers", "0")]
    result = run_cli(["train", "--data", fill, *args, "--epochs", "2", "--out", out])
    assert result.exit_code == 0, result.output
    config = read_checkpoint(out).train["config"]
    # random init: the method comparison's rates; numclip's head at 10× --lr unless --head-lr says
    assert (config["lr"], config["image_lr"], config["head_lr"]) == (3e-3, 3e-3, None)
    assert list(config["milestones"]) == [1, 2]  # auto: after 60 % and 85 % of 2 epochs
    assert config["workers"] == default_workers(36, 32, "cpu")
    # 4 validation images: said, with what to do about it
    assert "only 4 validation image(s)" in result.stderr and "--val-split" in result.stderr


def test_enough_validation_images_give_no_warning(run_cli, fill: Path, tmp_path: Path) -> None:
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "1", "--val-split", "0.5",
                      "--out", tmp_path / "m.safetensors"])
    assert result.exit_code == 0, result.output
    assert "validation image(s)" not in result.stderr


def test_milestones_past_the_last_epoch_are_warned_about(run_cli, fill: Path, tmp_path: Path) -> None:
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "1", "--milestones", "60",
                      "--out", tmp_path / "m.safetensors"])
    assert result.exit_code == 0, result.output
    assert "--milestones 60: the learning rate never drops in 1 epoch(s)" in result.stderr


def test_bad_labels_are_reported_once_per_problem_with_an_example_and_a_count(run_cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset("fill", data, n=40, seed=2)
    images = sorted(data.glob("*/*.png"))
    (data / "lots").mkdir()
    for i, image in enumerate(images[:30]):  # 30 images under a label that is no number and no bin name
        image.rename(data / "lots" / f"{i:02d}.png")
    (data / "99").mkdir()
    images[30].rename(data / "99" / "x.png")  # one image outside the task range
    result = run_cli(["train", "--data", data, *TINY])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].count("'lots'") == 1 and lines[0].count("outside the task range") == 1
    assert f"{data / 'lots' / '00.png'}: label 'lots'" in lines[0] and "(and 29 more like it)" in lines[0]
    assert "31 problem(s)" in lines[0]


def test_head_lr_is_stored_and_range_checked(run_cli, fill: Path, tmp_path: Path) -> None:
    from numclip_cli.checkpoint import read_checkpoint

    bad = run_cli(["train", "--data", tmp_path / "missing", *TINY, "--head-lr", "0"])
    assert bad.exit_code == 2 and "--head-lr" in bad.stderr
    out = tmp_path / "m.safetensors"
    result = run_cli(["train", "--data", fill, *TINY, "--epochs", "1", "--head-lr", "0.02", "--out", out])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out).train["config"]["head_lr"] == 0.02
