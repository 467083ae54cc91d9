"""``numclip bench``: the report's schema on a tiny run (not timed), the reference path it compares against, the
accuracy-suite wiring, and ``predict --fast`` against fp32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from numclip_cli.bench import SCHEMA, ReferencePredictor, rank_task
from numclip_cli.predictor import Predictor

CPU = torch.device("cpu")
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "numclip-tiny-dots.safetensors"
SPEED_FIGURES = {
    "decode", "raw_open_clip", "predict", "ratio_predict_raw",
    "text_tower_k", "predict_b1_k", "reference_b1_k", "ratio_reference_k",
    "text_tower_m", "predict_b1_m", "reference_b1_m", "ratio_reference_m",
    "predict_fast", "ratio_fast_raw", "fast_agreement",
    "cold_start", "cold_start_peak_rss", "help", "peak_rss",
}


def test_speed_report_has_environment_and_every_figure_with_a_unit(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = run_cli(["bench", "--suite", "speed", "--model", "numclip-tiny", "--pretrained", "none", "--quick",
                      "--device", "cpu", "--json", out])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["schema"] == SCHEMA and report["date"]
    env = report["environment"]
    for key in ("device", "device_name", "cpu_count", "torch_threads", "python", "torch", "open_clip", "numclip"):
        assert env[key], key
    assert env["device"] == "cpu"
    assert report["model"]["backbone"] == "numclip-tiny" and report["model"]["bins"] == 5
    figures = {figure["key"]: figure for figure in report["figures"]}
    assert SPEED_FIGURES <= set(figures)
    for figure in report["figures"]:
        assert isinstance(figure["value"], int | float) and math.isfinite(figure["value"]), figure
        assert figure["value"] >= 0 and figure["unit"] and figure["label"], figure
    # every ratio is the quotient of the figures it names, with a target and a verdict
    def value(key: str) -> float:
        return figures[key]["value"]

    ratios = {"ratio_predict_raw": value("predict") / value("raw_open_clip"),
              "ratio_fast_raw": value("predict_fast") / value("raw_open_clip"),
              "ratio_reference_k": value("reference_b1_k") / value("predict_b1_k"),
              "ratio_reference_m": value("reference_b1_m") / value("predict_b1_m")}
    for key, expected in ratios.items():
        assert figures[key]["unit"] == "x" and figures[key]["target"].startswith(">=")
        assert isinstance(figures[key]["met"], bool)
        assert value(key) == pytest.approx(expected, rel=0.01), key
    assert 0 <= value("fast_agreement") <= 100 and figures["fast_agreement"]["unit"] == "%"
    assert "raw open_clip" in result.stdout  # the rich table


def test_accuracy_suite_rows_are_in_the_report(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    result = run_cli(["bench", "--suite", "accuracy", "--kinds", "dots", "--methods", "zeroshot", "--n-train", "30",
                      "--n-test", "20", "--epochs", "1", "--device", "cpu", "--json", out])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(row["kind"], row["method"]) for row in report["accuracy"]] == [("dots", "median"), ("dots", "zeroshot")]
    assert set(report["accuracy_units"]) >= {"mae", "accuracy", "one_off", "qwk", "seconds"}
    assert report["figures"] == [] and report["model"] is None


def test_reference_path_recomputes_text_features_but_predicts_the_same(tiny_backbone, synthetic_images) -> None:
    from numclip_cli.model.methods import create_model
    from numclip_cli.tasks import get_task

    assert rank_task(101).rank_names() == get_task("age").rank_names()  # M = 101: the age task's rank prompts
    model = create_model("ordinalclip", tiny_backbone, rank_task(101)).eval()
    paths = synthetic_images[:6]
    cached = Predictor(model, CPU)
    reference = ReferencePredictor(model, CPU)
    calls = []
    model.prompt.register_forward_hook(lambda *_: calls.append(1))
    expected = list(cached.records(paths, tiny_backbone.preprocess, batch_size=2, workers=0))
    assert calls == []  # cached: the text tower never runs again
    got = list(reference.records(paths, tiny_backbone.preprocess, batch_size=2, workers=0))
    assert len(calls) == 3  # once per batch
    assert [r["value"] for r in got] == pytest.approx([r["value"] for r in expected], abs=1e-4)


def test_fast_predict_agrees_with_fp32_on_the_trained_tiny_model(tmp_path: Path) -> None:
    from numclip_cli.checkpoint import load_model
    from numclip_cli.synthetic import write_dataset

    write_dataset("dots", tmp_path, n=300, seed=7)
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    model, backbone, _ = load_model(DEMO_CHECKPOINT, CPU)
    fp32 = [r["bin_index"] for r in Predictor(model, CPU).records(paths, backbone.preprocess, 64, workers=0)]
    fast_model, _, _ = load_model(DEMO_CHECKPOINT, CPU)
    predictor = Predictor(fast_model, CPU, fast=True)
    fast = [r["bin_index"] for r in predictor.records(paths, backbone.preprocess, 64, workers=0)]
    assert predictor.image_tower is not None, "--fast did not replace the image tower"
    assert len(set(fp32)) >= 4  # a model that tells the bins apart, so agreement is not trivial
    agreement = sum(a == b for a, b in zip(fp32, fast, strict=True)) / len(paths)
    assert agreement >= 0.99
