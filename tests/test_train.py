"""Training through the CLI: it learns, it resumes exactly, and its checkpoints predict like the live model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from numclip_cli.checkpoint import read_checkpoint
from numclip_cli.cli.app import app
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.synthetic import write_dataset
from numclip_cli.trainer import last_path

TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu"]
FAST = ["--batch-size", "64", "--lr", "3e-3", "--image-lr", "1e-3", "--tune-context"]


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def dots(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dots")
    write_dataset("dots", root, n=1000, seed=0)
    return root


def test_learns_well_below_the_median_baseline(dots: Path, tmp_path: Path) -> None:
    out, metrics = tmp_path / "m.safetensors", tmp_path / "metrics.json"
    result = run_cli("train", "--data", str(dots), *TINY, *FAST, "--batch-size", "32", "--epochs", "8",
                     "--milestones", "6", "--val-split", "0.15", "--workers", "2", "--seed", "0", "--out", str(out),
                     "--metrics-out", str(metrics))
    assert result.exit_code == 0, result.output
    summary = json.loads(metrics.read_text())
    baseline, mae = summary["baseline_median_mae"], summary["val"]["mae"]
    assert 2.0 < baseline < 2.8  # dots 1..10 uniform: predicting the median is off by ~2.5 on average
    assert mae <= 0.5 * baseline, (mae, baseline)
    assert read_checkpoint(out).train["best_val_mae"] == pytest.approx(mae)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_dataset("fill", root, n=96, seed=3)
    return root


def _train(data: Path, out: Path, epochs: int, *extra: str):
    return run_cli("train", "--data", str(data), *TINY, *FAST, "--epochs", str(epochs), "--milestones", "2",
                   "--workers", "0", "--seed", "7", "--out", str(out), *extra)


def test_resume_matches_an_uninterrupted_run(small: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _train(small, straight, 3).exit_code == 0
    assert _train(small, resumed, 1).exit_code == 0  # "killed" after epoch 1 ...
    result = _train(small, resumed, 3, "--resume")  # ... and continued
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in result.stderr
    a, b = read_checkpoint(last_path(straight)).tensors, read_checkpoint(last_path(resumed)).tensors
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_without_a_previous_run_is_a_clear_error(small: Path, tmp_path: Path) -> None:
    result = _train(small, tmp_path / "none.safetensors", 2, "--resume")
    assert result.exit_code == 1
    assert "checkpoint not found" in result.stderr and len(result.stderr.strip().splitlines()) <= 3


@pytest.fixture(scope="module")
def trained(small: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "fill.safetensors"
    assert _train(small, out, 2).exit_code == 0
    return out


def test_checkpoint_metadata_follows_the_format(trained: Path) -> None:
    ckpt = read_checkpoint(trained)
    assert ckpt.method == "numclip" and ckpt.task.name == "fill"
    assert ckpt.backbone["name"] == "numclip-tiny" and ckpt.backbone["pretrained"] == "none"
    assert ckpt.backbone["model_cfg"]["embed_dim"] == 64 and ckpt.backbone["preprocess_cfg"]["size"]
    assert ckpt.train["data"]["n_train"] + ckpt.train["data"]["n_val"] == 96
    assert ckpt.resume is None  # only the *.last file carries optimizer state
    assert {"prompt.context", "prompt.words", "regressor.shift.0.weight"} <= ckpt.tensors.keys()


def test_predict_from_checkpoint_matches_the_in_process_model(trained: Path, small: Path) -> None:
    images = sorted(str(p) for p in small.glob("*/*.png"))[:10]
    loaded = create_model_and_transforms(checkpoint=trained)
    model, transform = loaded.model, loaded.transform
    from numclip_cli.images import load_rgb

    with torch.inference_mode():
        batch = torch.stack([transform(load_rgb(p)) for p in images])
        expected = model(batch).value
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "numclip"), "predict", *images, "--checkpoint",
                           str(trained), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in records] == images
    assert records[0]["task"] == "fill"
    torch.testing.assert_close(torch.tensor([r["value"] for r in records]), expected, atol=1e-3, rtol=0)


def test_unreadable_training_images_are_skipped_and_counted(small: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset("fill", data, n=40, seed=5)
    victim = sorted(data.glob("*/*.png"))[0]
    victim.write_bytes(b"not an image")
    result = _train(data, tmp_path / "s.safetensors", 1, "--val-split", "0.25")
    assert result.exit_code == 0, result.output
    assert "unreadable image(s) skipped" in result.stderr


def test_bad_options_are_usage_errors(small: Path, tmp_path: Path) -> None:
    assert _train(small, tmp_path / "x.safetensors", 1, "--milestones", "two").exit_code == 2
    assert _train(small, tmp_path / "x.safetensors", 1, "--method", "nope").exit_code == 2
    assert run_cli("train", "--data", str(tmp_path / "missing"), *TINY).exit_code == 1
