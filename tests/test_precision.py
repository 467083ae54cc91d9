"""``--precision`` on the CPU: training steps stay finite with float32 heads and losses, checkpoints load in fp32,
and predictions keep the fp32 bins of the shipped checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from numclip_cli.backbone import load_backbone
from numclip_cli.checkpoint import read_checkpoint
from numclip_cli.datasets import load_samples, split_validation
from numclip_cli.errors import UsageError
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.precision import PRECISIONS, resolve_precision
from numclip_cli.predictor import Predictor
from numclip_cli.synthetic import task_spec, write_dataset
from numclip_cli.trainer import TrainConfig, Trainer

CPU = torch.device("cpu")
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "numclip-tiny-dots.safetensors"
LOW = ["amp_bf16", "amp", "bf16", "fp16"]


def cpu_supports(precision: str) -> str | None:
    """Why ``precision`` cannot run on this CPU's torch, or None when it can."""
    try:
        with resolve_precision(precision, "cpu").autocast():
            torch.nn.Conv2d(3, 2, 2)(torch.ones(1, 3, 4, 4))
    except RuntimeError as exc:
        return f"torch {torch.__version__} cannot run {precision} on this CPU: {exc}"
    return None


def needs_cpu_support(precision: str) -> None:
    reason = cpu_supports(precision)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def dots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dots")
    write_dataset("dots", root, n=48, seed=0)
    return root


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """100 dots images the shipped checkpoint never saw (another seed)."""
    root = tmp_path_factory.mktemp("dots-test")
    write_dataset("dots", root, n=100, seed=11)
    return sorted(str(p) for p in root.rglob("*.png"))


def test_names_and_defaults_follow_open_clip() -> None:
    assert resolve_precision(None, "cpu").name == "fp32"
    assert resolve_precision(None, "cuda").name == "amp"  # only a name: no GPU needed
    assert resolve_precision("amp_bfloat16", "cpu").name == "amp_bf16"  # open_clip's other spelling
    amp = resolve_precision("amp", "cpu")
    assert (amp.autocast_dtype, amp.weight_dtype) == (torch.float16, None)
    bf16 = resolve_precision("bf16", "cpu")
    assert (bf16.autocast_dtype, bf16.weight_dtype) == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(UsageError, match="choose one of fp32, amp, amp_bf16, bf16, fp16"):
        resolve_precision("fp64", "cpu")


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_grad_scaler_is_on_exactly_for_fp16_autocast(name: str) -> None:
    assert resolve_precision(name, "cpu").grad_scaler().is_enabled() == (name in ("amp", "fp16"))


@pytest.mark.slow
@pytest.mark.parametrize("name", LOW)
def test_training_steps_are_finite_with_fp32_heads_and_the_checkpoint_loads_in_fp32(
        name: str, dots: Path, tmp_path: Path) -> None:
    needs_cpu_support(name)
    task = task_spec("dots")
    train, val = split_validation(load_samples(dots, task), 0.25, seed=0)
    torch.manual_seed(0)
    # 2 epochs of 5 steps at a high learning rate: long enough for pure fp16 weights to reach NaN
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, image_lr=1e-3, tune_context=True, workers=0, precision=name)
    trainer = Trainer(load_backbone("numclip-tiny", "none"), task, config, CPU)
    assert trainer.scaler.is_enabled() == (name in ("amp", "fp16"))
    seen: list[torch.dtype] = []
    loss = trainer.model.loss

    def checked_loss(out, values, bins):
        seen.extend([out.logits.dtype, out.value.dtype])
        losses = loss(out, values, bins)
        seen.append(losses["total"].dtype)
        return losses

    trainer.model.loss = checked_loss
    low = resolve_precision(name, "cpu").weight_dtype
    if low is not None:  # bf16/fp16: frozen weights (the text tower) are cast, trained ones (the image tower) not
        assert trainer.model.clip.transformer.resblocks[0].mlp.c_fc.weight.dtype == low
        assert trainer.model.clip.visual.conv1.weight.dtype == torch.float32
    out = tmp_path / "m.safetensors"
    history = trainer.fit(train, val, out).history
    assert seen and set(seen) == {torch.float32}, seen  # heads and losses computed in fp32 under autocast
    assert history and all(math.isfinite(report.train_loss) for report in history)
    assert read_checkpoint(out).train["config"]["precision"] == name
    model = create_model_and_transforms(checkpoint=out).model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        result = model(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(result.logits).all() and torch.isfinite(result.value).all()


@pytest.mark.parametrize("name", LOW)
def test_predict_keeps_the_fp32_bins_of_the_shipped_checkpoint(name: str, test_images: list[str]) -> None:
    needs_cpu_support(name)

    def predict(precision: str) -> list[dict]:
        loaded = create_model_and_transforms(CPU, checkpoint=SHIPPED)
        predictor = Predictor(loaded.model, CPU, precision=precision)
        records = list(predictor.records(test_images, loaded.transform, batch_size=32, workers=0))
        assert all(r["status"] == "ok" and math.isfinite(r["value"]) for r in records)
        return records

    reference, low = predict("fp32"), predict(name)
    assert any(a["value"] != b["value"] for a, b in zip(reference, low, strict=True))  # the precision was applied
    agreement = sum(a["bin_index"] == b["bin_index"] for a, b in zip(reference, low, strict=True)) / len(reference)
    assert agreement >= 0.95, agreement


def test_cli_precision_is_checked_before_the_model_loads(run_cli, test_images: list[str]) -> None:
    result = run_cli(["predict", test_images[0], "--checkpoint", "missing.safetensors", "--precision", "fp64"])
    assert result.exit_code == 2 and "--precision 'fp64'" in result.stderr, result.stderr


def test_cli_train_records_the_precision(run_cli, dots: Path, tmp_path: Path) -> None:
    needs_cpu_support("amp_bf16")
    out = tmp_path / "m.safetensors"
    result = run_cli(["train", "--data", dots, "--model", "numclip-tiny", "--pretrained", "none", "--offline",
                      "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                      "--precision", "amp_bf16", "--out", out, "-q"])
    assert result.exit_code == 0, result.stderr
    assert read_checkpoint(out).train["config"]["precision"] == "amp_bf16"
