"""``predict --fast``: the image tower as an int8 ONNX Runtime session (numclip[fast]) that keeps the fp32 bins,
quantises every constant-weight matrix product (the attention in-projection included), is cached and rebuilt
when damaged, and fails with one line when the extra is missing -- while predict without --fast needs nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from numclip_cli.errors import UsageError
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.feature_cache import cache_home
from numclip_cli.onnx_tower import NEEDS_EXTRA, fast_available, int8_image_tower
from numclip_cli.predictor import Predictor
from numclip_cli.synthetic import write_dataset

pytestmark = pytest.mark.skipif(not fast_available(), reason="numclip[fast] (onnxruntime, onnx) is not installed")

CPU = torch.device("cpu")
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "numclip-tiny-dots.safetensors"


def load_model(path):
    """The model a checkpoint holds, its backbone and predict's transform."""
    loaded = create_model_and_transforms(checkpoint=path)
    return loaded.model, loaded.backbone, loaded.transform


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """100 dots images the shipped checkpoint never saw."""
    root = tmp_path_factory.mktemp("dots-fast")
    write_dataset("dots", root, n=100, seed=12)
    return sorted(str(p) for p in root.rglob("*.png"))


@pytest.mark.slow
def test_fast_keeps_the_fp32_bins_of_the_shipped_checkpoint(test_images: list[str]) -> None:
    model, _, transform = load_model(SHIPPED)
    reference = list(Predictor(model, CPU).records(test_images, transform, 32, workers=0))
    fast = Predictor(load_model(SHIPPED)[0], CPU, fast=True)
    assert fast.image_tower is not None  # the int8 session replaced the torch tower
    got = list(fast.records(test_images, transform, 32, workers=0))
    assert any(a["value"] != b["value"] for a, b in zip(reference, got, strict=True))  # int8 really ran
    assert len({r["bin_index"] for r in reference}) >= 4  # a model that tells bins apart: agreement is not trivial
    agreement = sum(a["bin_index"] == b["bin_index"] for a, b in zip(reference, got, strict=True)) / len(got)
    assert agreement >= 0.99, agreement


def test_every_constant_weight_matrix_product_is_int8(tmp_path: Path) -> None:
    import onnx

    model, backbone, _ = load_model(SHIPPED)
    int8_image_tower(model.clip.visual, backbone.image_size, cache=tmp_path)
    (path,) = tmp_path.glob("*.int8.onnx")
    graph = onnx.load(str(path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    float_products = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    assert not [node.name for node in float_products if set(node.input) & weights]  # only activation × activation
    layers = len(model.clip.visual.transformer.resblocks)
    quantised = sum(node.op_type in ("MatMulInteger", "ConvInteger") for node in graph.node)
    assert quantised >= 4 * layers  # attention in- and out-projection and both MLP layers of every block


@pytest.mark.slow
def test_the_int8_model_is_cached_and_a_damaged_one_rebuilt(tmp_path: Path) -> None:
    model, backbone, _ = load_model(SHIPPED)
    images = torch.rand(3, 3, backbone.image_size, backbone.image_size)
    first = int8_image_tower(model.clip.visual, backbone.image_size, cache=tmp_path)(images)
    (path,) = tmp_path.glob("*.int8.onnx")
    stamp = path.stat().st_mtime_ns
    torch.testing.assert_close(int8_image_tower(model.clip.visual, backbone.image_size, cache=tmp_path)(images), first)
    assert path.stat().st_mtime_ns == stamp  # read, not rebuilt
    path.write_bytes(b"not an onnx model")
    torch.testing.assert_close(int8_image_tower(model.clip.visual, backbone.image_size, cache=tmp_path)(images), first)
    assert path.stat().st_size > 1000  # rebuilt in place


def test_predict_fast_uses_the_user_cache_folder(run_cli, test_images: list[str]) -> None:
    result = run_cli(["predict", *test_images[:3], "--checkpoint", SHIPPED, "--fast", "--device", "cpu",
                      "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["status"] for line in result.stdout.splitlines()] == ["ok"] * 3
    assert list((cache_home() / "onnx").glob("*.int8.onnx"))


def test_fast_does_not_combine_with_a_low_precision() -> None:
    with pytest.raises(UsageError, match="does not combine with --precision amp_bf16"):
        Predictor(load_model(SHIPPED)[0], CPU, fast=True, precision="amp_bf16")


def test_without_the_extra_fast_is_one_line_and_predict_still_works(run_cli, test_images: list[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("onnxruntime", "onnx"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as when not installed
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("onnxruntime", "onnx") else find_spec(name, *args))
    result = run_cli(["predict", test_images[0], "--checkpoint", SHIPPED, "--fast", "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip() == f"numclip: error: {NEEDS_EXTRA}", result.stderr
    plain = run_cli(["predict", test_images[0], "--checkpoint", SHIPPED, "--device", "cpu", "--format", "jsonl"])
    assert plain.exit_code == 0 and json.loads(plain.stdout)["status"] == "ok", plain.stderr
