"""``numclip bench``: the report's schema on a tiny run (not timed), targets only where they apply, smoke runs
labelled, the reference path it compares against, the accuracy suite (rows, median baseline, markdown table, early
checks), and ``predict --fast`` against fp32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from numclip_cli.bench import accuracy, speed
from numclip_cli.bench.accuracy import AccuracyConfig, run_accuracy_suite
from numclip_cli.bench.report import (
    ACCURACY_COLUMNS,
    SCHEMA,
    SMOKE_NOTE,
    Figure,
    SpeedResult,
    accuracy_markdown,
    judge,
    markdown,
)
from numclip_cli.bench.speed import ReferencePredictor, rank_task
from numclip_cli.errors import UsageError
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


@pytest.mark.slow
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
    assert report["model"]["trained"] is False
    figures = {figure["key"]: figure for figure in report["figures"]}
    assert SPEED_FIGURES <= set(figures)
    for figure in report["figures"]:
        assert isinstance(figure["value"], int | float) and math.isfinite(figure["value"]), figure
        assert figure["value"] >= 0 and figure["unit"] and figure["label"], figure

    def value(key: str) -> float:
        return figures[key]["value"]

    # every ratio is the quotient of the figures it names
    ratios = {"ratio_predict_raw": value("predict") / value("raw_open_clip"),
              "ratio_fast_raw": value("predict_fast") / value("raw_open_clip"),
              "ratio_reference_k": value("reference_b1_k") / value("predict_b1_k"),
              "ratio_reference_m": value("reference_b1_m") / value("predict_b1_m")}
    for key, expected in ratios.items():
        assert figures[key]["unit"] == "x"
        assert value(key) == pytest.approx(expected, rel=0.01), key
    assert 0 <= value("fast_agreement") <= 100 and figures["fast_agreement"]["unit"] == "%"
    # the help's own example: ViT-B-16's ratio targets do not apply to numclip-tiny, and --quick judges nothing
    assert report["smoke_run"] == SMOKE_NOTE and report["config"]["quick"] is True
    for key in ratios:
        assert figures[key]["target"] is None and figures[key]["met"] is None, key
    assert figures["fast_agreement"]["target"] is None  # random init
    assert figures["help"]["target"] == "< 0.5" and figures["help"]["met"] is None  # shown, not judged
    assert "ViT-B-16" in report["targets_note"]
    assert "raw open_clip" in result.stdout  # the rich table
    assert "✗" not in result.stdout and "✓" not in result.stdout
    assert SMOKE_NOTE in " ".join(result.stdout.split())  # in the table title (rich may wrap it)


def _figure(key: str, value: float) -> Figure:
    return Figure(key, key, value, "x")


def test_targets_apply_only_to_the_model_they_were_set_for() -> None:
    figures = [_figure("ratio_predict_raw", 0.5), _figure("fast_agreement", 99.5), _figure("help", 0.7),
               _figure("decode", 100.0)]
    model = {"backbone": "ViT-B-16", "pretrained": "openai", "trained": True}
    judged = {f.key: f for f in judge(SpeedResult(model, figures), smoke=False)}
    assert (judged["ratio_predict_raw"].target, judged["ratio_predict_raw"].met) == (">= 0.9", False)
    assert (judged["fast_agreement"].target, judged["fast_agreement"].met) == (">= 99", True)
    assert (judged["help"].target, judged["help"].met) == ("< 0.5", False)
    assert (judged["decode"].target, judged["decode"].met) == (None, None)
    random_vit = {f.key: f for f in judge(SpeedResult({**model, "trained": False}, figures), smoke=False)}
    assert random_vit["ratio_predict_raw"].target == ">= 0.9" and random_vit["fast_agreement"].target is None
    tiny = {f.key: f for f in judge(SpeedResult({**model, "backbone": "numclip-tiny"}, figures), smoke=False)}
    assert tiny["ratio_predict_raw"].target is None and tiny["ratio_predict_raw"].met is None
    assert tiny["fast_agreement"].met is True and tiny["help"].met is False  # model-independent targets stay
    smoke = judge(SpeedResult(model, figures), smoke=True)
    assert all(f.met is None for f in smoke) and smoke[0].target == ">= 0.9"


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


@pytest.mark.slow
def test_fast_predict_agrees_with_fp32_on_the_trained_tiny_model(tmp_path: Path) -> None:
    from numclip_cli.factory import create_model_and_transforms
    from numclip_cli.synthetic import write_dataset

    write_dataset("dots", tmp_path, n=300, seed=7)
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    loaded = create_model_and_transforms(CPU, checkpoint=DEMO_CHECKPOINT)
    fp32 = [r["bin_index"] for r in Predictor(loaded.model, CPU).records(paths, loaded.transform, 64, workers=0)]
    fast_model = create_model_and_transforms(CPU, checkpoint=DEMO_CHECKPOINT).model
    predictor = Predictor(fast_model, CPU, fast=True)
    fast = [r["bin_index"] for r in predictor.records(paths, loaded.transform, 64, workers=0)]
    assert predictor.image_tower is not None, "--fast did not replace the image tower"
    assert len(set(fp32)) >= 4  # a model that tells the bins apart, so agreement is not trivial
    agreement = sum(a == b for a, b in zip(fp32, fast, strict=True)) / len(paths)
    # 296/300 on an AVX2 CPU without VNNI (7-bit weights there; 8-bit ones kept 265/300, see saturating_int8)
    assert agreement >= 0.98


# ------------------------------------------------------------------------------------------ accuracy suite
@pytest.fixture(scope="module")
def rows() -> list[dict]:
    seen: list[dict] = []
    config = AccuracyConfig.create(kinds=["fill"], methods=["zeroshot", "linear-probe"], n_train=40, n_test=12,
                                   epochs=1, seeds=[0])
    result = run_accuracy_suite(config, CPU, on_progress=seen.append)
    assert seen == result
    return result


@pytest.mark.slow
def test_accuracy_rows_hold_every_metric_and_the_median_baseline(rows: list[dict]) -> None:
    assert [(r["kind"], r["method"]) for r in rows] == [("fill", "median"), ("fill", "zeroshot"),
                                                        ("fill", "linear-probe")]
    for row in rows:
        assert set(row) == {"kind", "method", "seed", "shots", *ACCURACY_COLUMNS}
        for name in ("mae", "accuracy", "one_off", "qwk", "seconds"):
            assert math.isfinite(row[name]), (row["method"], name)
        assert 0 <= row["accuracy"] <= row["one_off"] <= 1
    median, zeroshot, probe = rows
    assert median["qwk"] == 0.0 and median["mae_max"] is None and zeroshot["mae_max"] is None
    assert math.isfinite(probe["mae_max"])


@pytest.mark.slow
def test_accuracy_markdown_table_has_a_row_per_result(rows: list[dict]) -> None:
    table = accuracy_markdown(rows).splitlines()
    assert table[0] == "| kind | method | seed | shots | mae | mae_max | accuracy | one_off | qwk | seconds |"
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| fill | median | 0 | – | ") and "| – |" in table[2]


@pytest.mark.slow
def test_accuracy_suite_in_the_cli_report_and_as_markdown(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    result = run_cli(["bench", "--suite", "accuracy", "--quick", "--kinds", "dots", "--methods", "zeroshot",
                      "--n-train", "30", "--n-test", "20", "--device", "cpu", "--json", out, "--markdown"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(row["kind"], row["method"]) for row in report["accuracy"]] == [("dots", "median"), ("dots", "zeroshot")]
    assert set(report["accuracy_units"]) >= {"mae", "accuracy", "one_off", "qwk", "seconds"}
    assert report["figures"] == [] and report["model"] is None
    assert report["smoke_run"] == SMOKE_NOTE and report["config"]["accuracy"]["epochs"] == 1
    assert result.stdout.strip() == markdown(report)  # --markdown prints the report's tables, nothing else
    assert f"Test MAE on the synthetic suites, mean ± std over 1 seed(s) ({SMOKE_NOTE})" in result.stdout
    assert "| zeroshot | " in result.stdout and "| dots | zeroshot | 0 | – |" in result.stdout


@pytest.mark.parametrize("bad", [["--methods", "bogus"], ["--kinds", "squares"]])
def test_unknown_method_or_kind_fails_before_any_work(run_cli, monkeypatch, bad: list[str]) -> None:
    work: list[str] = []
    monkeypatch.setattr(accuracy, "write_dataset", lambda *a, **k: work.append("accuracy data"))
    monkeypatch.setattr(speed, "create_model_and_transforms", lambda *a, **k: work.append("speed suite"))
    result = run_cli(["bench", "--suite", "all", "--device", "cpu", *bad])
    assert result.exit_code == 2
    assert bad[1] in result.stderr
    assert work == []  # neither suite started: no model loaded, no image written
    with pytest.raises(UsageError, match=bad[1]):
        AccuracyConfig.create(**{bad[0][2:]: [bad[1]]})

