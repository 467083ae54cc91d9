"""The CUDA paths a CPU-only CI cannot run, ready for ``make gpu-check`` on a machine with a GPU: every
``--precision`` trains, predict feeds channels_last images, an out-of-memory batch is halved until it fits,
2-process nccl DDP matches one process, and predict's throughput and peak memory for ViT-B-16 at batch 1/32/256.

Every test is marked ``cuda`` and skipped, with the reason shown, where torch sees no CUDA device.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ddp_and_single_process_runs

from numclip_cli.datasets import load_samples, split_validation
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.precision import PRECISIONS
from numclip_cli.predictor import Predictor
from numclip_cli.synthetic import task_spec, write_dataset
from numclip_cli.trainer import TrainConfig, Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: run `make gpu-check` on a machine with one")]

GPU = torch.device("cuda")
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "numclip-tiny-dots.safetensors"
NUMCLIP = str(Path(sys.executable).parent / "numclip")
MB = 2**20


@pytest.fixture(scope="module")
def dots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dots")
    write_dataset("dots", root, n=64, seed=1)
    return root


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_every_precision_trains_numclip_tiny(name: str, dots: Path, tmp_path: Path) -> None:
    from numclip_cli.backbone import load_backbone

    if "bf16" in name and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16 support")
    task = task_spec("dots")
    train, val = split_validation(load_samples(dots, task), 0.25, seed=0)
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, image_lr=1e-3, tune_context=True, workers=0, precision=name)
    trainer = Trainer(load_backbone("numclip-tiny", "none", device=GPU), task, config, GPU)
    assert trainer.scaler.is_enabled() == (PRECISIONS[name][0] == torch.float16)
    out = tmp_path / "m.safetensors"
    history = trainer.fit(train, val, out).history
    assert all(math.isfinite(report.train_loss) for report in history), history
    assert math.isfinite(history[-1].val["mae"])
    model = create_model_and_transforms(checkpoint=out).model  # on the CPU, in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_predict_feeds_channels_last_and_keeps_the_cpu_bins(tmp_path: Path) -> None:
    write_dataset("dots", tmp_path, n=100, seed=11)
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    cpu = create_model_and_transforms(checkpoint=SHIPPED)
    reference = [r["bin_index"] for r in Predictor(cpu.model, torch.device("cpu")).records(
        paths, cpu.transform, 32, workers=0)]
    model = create_model_and_transforms(GPU, checkpoint=SHIPPED).model
    predictor = Predictor(model, GPU)  # the CUDA default: amp
    assert predictor.precision.name == "amp"
    layouts = []
    model.clip.visual.conv1.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    got = [r["bin_index"] for r in predictor.records(paths, cpu.transform, 32, workers=2)]
    assert layouts and all(layouts)
    assert model.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    agreement = sum(a == b for a, b in zip(reference, got, strict=True)) / len(got)
    assert agreement >= 0.95, agreement


def test_a_batch_that_cannot_fit_is_halved_until_it_does() -> None:
    session = create_model_and_transforms(GPU, model="ViT-B-16", pretrained="none", task="age", method="numclip")
    warnings: list[str] = []
    predictor = Predictor(session.model, GPU, warn=warnings.append)
    images = torch.rand(1024, 3, 224, 224)  # 616 MB in fp32: more than the 256 MB allowed below
    torch.cuda.empty_cache()
    allowed = torch.cuda.memory_reserved(GPU) + 256 * MB
    torch.cuda.set_per_process_memory_fraction(allowed / torch.cuda.get_device_properties(GPU).total_memory, GPU)
    try:
        out = predictor.predict_fitting(images)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, GPU)
    assert out["value"].shape == (1024,) and torch.isfinite(out["value"]).all()
    assert predictor.max_batch is not None and predictor.max_batch < 1024
    assert warnings and warnings[0].startswith("out of cuda") and "--batch-size" in warnings[0], warnings


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl DDP needs at least 2 GPUs")
def test_two_process_nccl_training_matches_one_process(tmp_path: Path) -> None:
    a, b, _ = ddp_and_single_process_runs(tmp_path, "cuda", "--precision", "fp32")
    for key in a:  # nccl sums in another order than one process, and cuDNN may pick other kernels
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_predict_throughput_and_peak_memory_of_vit_b16(batch: int, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    result = subprocess.run([NUMCLIP, "bench", "--device", "cuda", "--model", "ViT-B-16", "--pretrained", "none",
                             "--batch-size", str(batch), "--images", str(max(64, batch)), "--quick", "--no-fast",
                             "--offline", "--quiet", "--json", str(report)],
                            capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = {f["key"]: f for f in json.loads(report.read_text())["figures"]}
    rate, ratio, peak = (figures[key]["value"] for key in ("predict", "ratio_predict_raw", "peak_cuda"))
    assert rate > 0 and peak > 0
    with capsys.disabled():
        print(f"\nViT-B-16, batch {batch}: predict {rate:.1f} images/s ({ratio:.2f}x raw open_clip), "
              f"peak CUDA memory {peak:.0f} MB")
