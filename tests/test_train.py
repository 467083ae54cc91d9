"""Training through the CLI: it learns, it resumes exactly, and its checkpoints predict like the live model."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result

from numclip_cli.checkpoint import read_checkpoint
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.synthetic import write_dataset
from numclip_cli.trainer import last_path

TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu"]
FAST = ["--batch-size", "64", "--lr", "3e-3", "--image-lr", "1e-3", "--tune-context"]


def checked(result: Result) -> Result:
    """A run that ended through an exit code (success or a handled error), never an escaped exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def sizes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("size")
    write_dataset("size", root, n=400, seed=0)
    return root


@pytest.mark.slow
def test_learns_well_below_the_median_baseline(run_cli, sizes: Path, tmp_path: Path) -> None:
    # "how large is the square" is the synthetic task a random-init tiny model learns fastest (the accuracy
    # suite: MAE ≈ 0.25 after ~100 steps of batch 16, seeds 0-2), so a short run must land far below the median
    out, metrics = tmp_path / "m.safetensors", tmp_path / "metrics.json"
    result = checked(run_cli(["train", "--data", sizes, *TINY, *FAST, "--batch-size", "16", "--image-lr", "3e-3",
                              "--epochs", "6", "--milestones", "5", "--val-split", "0.15", "--workers", "2",
                              "--seed", "0", "--out", out, "--metrics-out", metrics]))
    assert result.exit_code == 0, result.output
    summary = json.loads(metrics.read_text())
    baseline, mae = summary["baseline_median_mae"], summary["val"]["mae"]
    assert 2.0 < baseline < 2.8  # sizes 1..10 uniform: predicting the median is off by ~2.5 on average
    assert mae <= 0.25 * baseline, (mae, baseline)
    train = read_checkpoint(out).train
    assert train["select"] == "mae" and train["best_val"] == pytest.approx(mae)  # synthetic tasks: selected on MAE


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_dataset("fill", root, n=96, seed=3)
    return root


@pytest.fixture(scope="module")
def train(run_cli) -> Callable[..., Result]:
    """``train(data, out, epochs, *extra)``: a short, seeded ``numclip train`` run on the tiny model."""

    def run(data: Path, out: Path, epochs: int, *extra: str) -> Result:
        return checked(run_cli(["train", "--data", data, *TINY, *FAST, "--epochs", epochs, "--milestones", "2",
                                "--workers", "0", "--seed", "7", "--out", out, *extra]))

    return run


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(train, small: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert train(small, straight, 3).exit_code == 0
    assert train(small, resumed, 1).exit_code == 0  # "killed" after epoch 1 ...
    result = train(small, resumed, 3, "--resume")  # ... and continued
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in result.stderr
    a, b = read_checkpoint(last_path(straight)).tensors, read_checkpoint(last_path(resumed)).tensors
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_without_a_previous_run_is_a_clear_error(train, small: Path, tmp_path: Path) -> None:
    result = train(small, tmp_path / "none.safetensors", 2, "--resume")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("numclip: error")]
    assert "checkpoint not found" in result.stderr and len(errors) == 1, result.stderr
    assert len(result.stderr.splitlines()) <= 6, result.stderr  # warnings, device, the error: nothing more


@pytest.fixture(scope="module")
def trained(train, small: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "fill.safetensors"
    assert train(small, out, 2).exit_code == 0
    return out


@pytest.mark.slow
def test_checkpoint_metadata_follows_the_format(trained: Path) -> None:
    ckpt = read_checkpoint(trained)
    assert ckpt.method == "numclip" and ckpt.task.name == "fill"
    assert ckpt.backbone["name"] == "numclip-tiny" and ckpt.backbone["pretrained"] == "none"
    assert ckpt.backbone["model_cfg"]["embed_dim"] == 64 and ckpt.backbone["preprocess_cfg"]["size"]
    assert ckpt.train["data"]["n_train"] + ckpt.train["data"]["n_val"] == 96
    assert ckpt.resume is None  # only the *.last file carries optimizer state
    assert {"prompt.context", "prompt.words", "regressor.offset.weight"} <= ckpt.tensors.keys()


@pytest.mark.slow
def test_predict_from_checkpoint_matches_the_in_process_model(trained: Path, small: Path, numclip_bin: Path,
                                                              clean_env: dict[str, str]) -> None:
    images = sorted(str(p) for p in small.glob("*/*.png"))[:10]
    loaded = create_model_and_transforms(checkpoint=trained)
    model, transform = loaded.model, loaded.transform
    from numclip_cli.images import load_rgb

    with torch.inference_mode():
        batch = torch.stack([transform(load_rgb(p)) for p in images])
        expected = model(batch).value
    proc = subprocess.run([str(numclip_bin), "predict", *images, "--checkpoint", str(trained), "--device", "cpu"],
                          capture_output=True, text=True, env=clean_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in records] == images
    assert records[0]["task"] == "fill"
    torch.testing.assert_close(torch.tensor([r["value"] for r in records]), expected, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_unreadable_training_images_are_skipped_and_counted(train, small: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset("fill", data, n=40, seed=5)
    victim = sorted(data.glob("*/*.png"))[0]
    victim.write_bytes(b"not an image")
    result = train(data, tmp_path / "s.safetensors", 1, "--val-split", "0.25")
    assert result.exit_code == 0, result.output
    assert "unreadable image(s) skipped" in result.stderr


def test_bad_options_are_usage_errors(train, run_cli, small: Path, tmp_path: Path) -> None:
    assert train(small, tmp_path / "x.safetensors", 1, "--milestones", "two").exit_code == 2
    assert train(small, tmp_path / "x.safetensors", 1, "--method", "nope").exit_code == 2
    # the method is checked before the data is read: a bad name wins over a missing folder
    result = run_cli(["train", "--data", tmp_path / "missing", *TINY, "--method", "nope"])
    assert result.exit_code == 2 and "unknown method 'nope'" in result.stderr
    assert "numclip-position" in result.stderr
    assert checked(run_cli(["train", "--data", tmp_path / "missing", *TINY])).exit_code == 1
