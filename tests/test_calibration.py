"""Calibration: temperature scaling, split-conformal intervals and contiguous bin sets, `numclip calibrate`, and
`numclip predict --coverage`.

The statistics are checked on synthetic predictions drawn from a known distribution (fast, thousands of
samples); the command line end to end on a numclip-tiny model trained for two epochs on synthetic "size"
images (the generator a random-init tiny model learns fastest) and then made over-confident by multiplying
its logit scale by 5.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from numclip_cli import calibration as cal
from numclip_cli import conformal, metrics, plotting
from numclip_cli.checkpoint import read_checkpoint, write_checkpoint
from numclip_cli.errors import CheckpointError, DataError, UsageError
from numclip_cli.synthetic import task_spec, write_dataset

TASK = task_spec("dots")  # labels 1..10 in five bins of two
SIZE = task_spec("size")  # the same labels and bins, for the trained model
CPU = ["--device", "cpu", "--offline"]
OVERCONFIDENCE = 5.0


# ----------------------------------------------------------------------------------- synthetic predictions
def synthetic_held(n: int, seed: int, noise: float = 1.2) -> tuple[cal.HeldOut, torch.Tensor]:
    """Predictions ŷ = μ with labels y = round(μ + N(0, noise²)) clipped to 1..10, and an over-confident model.

    Returns the held-out set (bin logits = 5 × the true log-probabilities of the bins given μ) and the true
    bin probabilities, so the ideal temperature is exactly 5.
    """
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(n, generator=g, dtype=torch.float64) * 9.4 + 0.8
    labels = (mu + noise * torch.randn(n, generator=g, dtype=torch.float64)).round().clamp(1, 10)
    edges = torch.arange(1.5, 10.0, 1.0, dtype=torch.float64)  # between consecutive labels
    cdf = torch.special.ndtr((edges[None, :] - mu[:, None]) / noise)
    cdf = torch.cat([torch.zeros(n, 1, dtype=torch.float64), cdf, torch.ones(n, 1, dtype=torch.float64)], 1)
    p_label = cdf.diff(dim=1)  # P(y = 1..10 | μ)
    p_bin = p_label.reshape(n, 5, 2).sum(dim=2)
    bins = torch.tensor([TASK.bin_index(v) for v in labels.tolist()])
    held = cal.HeldOut(bin_logits=OVERCONFIDENCE * p_bin.clamp_min(1e-12).log(), values=mu, targets=labels,
                       bins=bins, source=f"synthetic seed {seed}")
    return held, p_bin


@pytest.fixture(scope="module")
def splits() -> tuple[cal.HeldOut, cal.HeldOut]:
    """A calibration split and a third, untouched test split (the model was 'trained' elsewhere)."""
    return synthetic_held(1000, seed=1)[0], synthetic_held(1000, seed=2)[0]


def test_temperature_undoes_a_known_overconfidence(splits) -> None:
    calib, test = splits
    result = cal.calibrate(calib, TASK)
    assert result.temperature == pytest.approx(OVERCONFIDENCE, rel=0.1)
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    assert after["brier"] < before["brier"] and after["rps"] < before["rps"]
    assert after["accuracy"] == before["accuracy"] and after["mae"] == before["mae"]  # T changes neither
    # and on data it never saw
    unseen_before = cal.calibration_metrics(test, TASK, 1.0)
    unseen_after = cal.calibration_metrics(test, TASK, result.temperature)
    assert unseen_after["ece"] < 0.5 * unseen_before["ece"] and unseen_after["ece"] < 0.05
    assert unseen_after["nll"] < unseen_before["nll"]


def test_fit_temperature_finds_the_nll_minimum() -> None:
    held, _ = synthetic_held(400, seed=5)
    t = cal.fit_temperature(held.bin_logits, held.bins)
    nll = [metrics.nll(held.bin_logits / (t * f), held.bins) for f in (0.97, 1.0, 1.03)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def covered(held: cal.HeldOut, rule: conformal.ConformalRule) -> tuple[float, float]:
    """Empirical coverage of the intervals and of the bin sets on ``held``."""
    summary = cal.conformal_summary(held, rule, TASK)
    return summary["interval_coverage"], summary["set_coverage"]


@pytest.mark.parametrize("coverage", [0.9, 0.8])
def test_conformal_coverage_holds_on_an_untouched_split(splits, coverage: float) -> None:
    calib, test = splits
    result = cal.calibrate(calib, TASK, coverage=0.9)
    rule = result.rule(coverage)  # 0.8 is recomputed from the stored scores
    interval, bin_set = covered(test, rule)
    assert coverage - 0.05 <= interval <= coverage + 0.05
    assert coverage - 0.05 <= bin_set <= coverage + 0.05
    assert rule.interval_quantiles == (conformal.conformal_quantile(result.interval_scores, coverage),)


def test_bin_sets_are_contiguous_hold_the_top_bin_and_grow_with_coverage(splits) -> None:
    calib, test = splits
    result = cal.calibrate(calib, TASK)
    probs = test.probs()
    top = probs.argmax(dim=1)
    sizes = []
    for coverage in (0.5, 0.8, 0.95):
        low, high = result.rule(coverage).bin_sets(test.bin_logits)
        assert bool(((low <= top) & (top <= high)).all())
        sizes.append((high - low + 1).double().mean().item())
        # contiguous sets hold at least the mass the threshold asks for, or every bin
        inside = torch.arange(5)[None, :]
        mass = (probs * ((low[:, None] <= inside) & (inside <= high[:, None]))).sum(dim=1)
        assert bool((mass >= result.rule(coverage).set_thresholds[0] - 1e-9).all())
    assert sizes[0] < sizes[1] < sizes[2]


def test_a_bin_is_in_the_set_exactly_when_its_score_is_below_the_threshold() -> None:
    g = torch.Generator().manual_seed(3)
    probs = torch.distributions.Dirichlet(torch.full((7,), 0.7)).sample((300,))
    labels = torch.randint(0, 7, (300,), generator=g)
    scores = conformal.set_scores(probs, labels)
    for threshold in (0.0, 0.3, 0.6, 0.9, 0.99):
        low, high = conformal.contiguous_sets(probs, threshold)
        inside = (low <= labels) & (labels <= high)
        assert torch.equal(inside, scores <= threshold)


def test_finite_sample_quantile() -> None:
    scores = [float(i) for i in range(1, 101)]  # n = 100
    assert conformal.conformal_quantile(scores, 0.9) == 91.0  # k = ⌈101 · 0.9⌉ = 91
    assert conformal.conformal_quantile(scores[:19], 0.95) == 19.0  # k = ⌈20 · 0.95⌉ = 19, not 20 by rounding
    with pytest.raises(UsageError, match="needs at least 99 calibration samples, there are 50"):
        conformal.conformal_quantile(scores[:50], 0.99)
    for bad in (0.0, 1.0, 1.5, math.nan):
        with pytest.raises(UsageError, match="between 0 and 1"):
            conformal.conformal_quantile(scores, bad)


def test_too_little_data_is_an_error_and_a_missing_bin_a_warning(splits) -> None:
    calib, _ = splits
    with pytest.raises(DataError, match="19 usable calibration image.*at least 20"):
        cal.calibrate(calib.subset(torch.arange(19)), TASK)
    no_top_bin = calib.subset(calib.bins < 4)
    result = cal.calibrate(no_top_bin, TASK)
    assert any("no calibration sample in bin(s) ['nine or ten']" in w for w in result.warnings)
    assert not cal.calibrate(calib, TASK).warnings
    same_as_training = cal.calibrate(calib, TASK, train_data=calib.source).warnings
    assert any("is the checkpoint's training data" in w for w in same_as_training)
    with pytest.raises(UsageError, match="coverage 0.99 needs at least 99"):
        cal.calibrate(calib.subset(torch.arange(60)), TASK, coverage=0.99)


def test_calibration_metadata_round_trips_through_a_checkpoint(splits, tmp_path: Path, tiny_backbone) -> None:
    from numclip_cli.checkpoint import Checkpoint

    result = cal.calibrate(splits[0], TASK)
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, Checkpoint(tensors={"x": torch.zeros(1)}, task=TASK, method="numclip",
                                      backbone=tiny_backbone.describe(), calibration=result.to_metadata()))
    stored = read_checkpoint(path).calibration
    rule = result.rule()
    assert stored["quantiles"] == {"interval": rule.interval_quantiles[0], "set": rule.set_thresholds[0]}
    assert stored["scores"]["interval"] == sorted(stored["scores"]["interval"]) and stored["n"] == 750
    assert stored["version"] == 1 and stored["conformal"] == "global"  # readable by numclip before per-bin
    assert stored["holdout"] == {"fraction": 0.25, "seed": 0, "n_fit": 750, "n_check": 250}
    assert stored["achieved"] == result.achieved and stored["achieved"]["n"] == 250
    again = cal.Calibration.from_metadata(stored)
    assert again.rule(0.8) == result.rule(0.8) and again.temperature == result.temperature
    assert cal.prediction_settings(stored, None) == (result.temperature, None)
    damaged = {**stored, "scores": {"interval": [1.0], "set": []}}
    with pytest.raises(CheckpointError, match="damaged calibration metadata"):
        cal.Calibration.from_metadata(damaged)
    with pytest.raises(UsageError, match="numclip calibrate"):
        cal.prediction_settings(None, 0.9)


# ------------------------------------------------------------------------ the held-out check and per-bin
def test_held_out_split_is_seeded_stratified_and_disjoint(splits) -> None:
    calib, _ = splits
    fit, check = cal.split_held(calib, 0.25, seed=3)
    assert len(fit) + len(check) == len(calib) and len(check) == 250
    per_bin = torch.bincount(calib.bins, minlength=5)
    assert torch.equal(torch.bincount(check.bins, minlength=5), (per_bin.double() * 0.25).round().long())
    rows = {tuple(row) for row in torch.stack([calib.values, calib.targets], 1).tolist()}
    fit_rows = {tuple(row) for row in torch.stack([fit.values, fit.targets], 1).tolist()}
    check_rows = {tuple(row) for row in torch.stack([check.values, check.targets], 1).tolist()}
    assert fit_rows | check_rows == rows and not fit_rows & check_rows
    assert torch.equal(cal.split_held(calib, 0.25, seed=3)[1].values, check.values)  # seeded
    assert not torch.equal(cal.split_held(calib, 0.25, seed=4)[1].values, check.values)


def test_calibrate_measures_what_it_achieves_on_data_it_did_not_fit(splits) -> None:
    calib, _ = splits
    result = cal.calibrate(calib, TASK, seed=7)
    fit, check = cal.split_held(calib, cal.DEFAULT_HOLDOUT, seed=7)
    assert result.n == len(fit) == 750 and result.holdout == {"fraction": 0.25, "seed": 7, "n_fit": 750,
                                                               "n_check": 250}
    assert result.temperature == cal.fit_temperature(fit.bin_logits, fit.bins)  # fitted on the fit part only
    assert result.achieved == cal.conformal_summary(check, result.rule(), TASK)  # measured on the other part
    assert abs(result.achieved["interval_coverage"] - 0.9) < 3 * result.achieved["standard_error"]
    assert abs(result.achieved["set_coverage"] - 0.9) < 3 * result.achieved["standard_error"]
    assert [row["n"] for row in result.achieved["per_bin"]] == torch.bincount(check.bins, minlength=5).tolist()
    assert result.metrics["after"] == cal.calibration_metrics(check, TASK, result.temperature)
    everything = cal.calibrate(calib, TASK, holdout=0)
    assert everything.n == 1000 and everything.achieved is None and not everything.warnings


def test_calibrate_reports_the_paper_metrics_before_and_after(splits) -> None:
    calib, _ = splits
    before, after = (cal.calibrate(calib, TASK).metrics[key] for key in ("before", "after"))
    for key in ("mae", "mae_levels", "mae_levels_max", "accuracy", "rank_accuracy", "one_off", "qwk", "rps", "cs@1",
                "ece", "nll", "brier"):
        assert key in before and key in after
    for key in ("mae", "mae_levels_max", "accuracy", "rank_accuracy", "one_off", "qwk", "cs@1"):
        assert before[key] == after[key]  # argmax and fine value: a temperature cannot move them
    assert after["rps"] < before["rps"] and after["mae_levels"] != before["mae_levels"]


def test_a_small_held_out_part_is_flagged_and_a_tiny_one_not_used(splits) -> None:
    calib, _ = splits
    small = cal.calibrate(calib.subset(torch.arange(200)), TASK)  # a quarter of each bin, rounded: 51
    assert small.achieved is not None and small.achieved["n"] == small.holdout["n_check"] == 51
    assert any("measured on only 51 held-out images (± 0.08" in w for w in small.warnings)
    tiny = cal.calibrate(calib.subset(torch.arange(60)), TASK)  # 15 would be held out: too few to say anything
    assert tiny.achieved is None and tiny.n == 60
    assert any("too few to hold out 25%" in w and "not measured" in w for w in tiny.warnings)
    with pytest.raises(UsageError, match="--holdout"):
        cal.calibrate(calib, TASK, holdout=1.0)


def regressed_held(n: int, seed: int) -> cal.HeldOut:
    """A model that pulls its rarest, top bin towards the middle (regression to the mean), sure of itself.

    Labels 1..10, 9 and 10 drawn 0.4 times as often as the others; ŷ = y + N(0, 0.6²), minus 2 for the top bin;
    bin probabilities of a model that believes ŷ ± 1.
    """
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1.0] * 8 + [0.4] * 2, dtype=torch.float64)
    labels = (torch.multinomial(weights, n, replacement=True, generator=g) + 1).double()
    mu = labels - torch.where(labels >= 9, 2.0, 0.0) + 0.6 * torch.randn(n, generator=g, dtype=torch.float64)
    mu = mu.clamp(1, 10)
    edges = torch.arange(1.5, 10.0, 1.0, dtype=torch.float64)
    cdf = torch.special.ndtr(edges[None, :] - mu[:, None])
    cdf = torch.cat([torch.zeros(n, 1, dtype=torch.float64), cdf, torch.ones(n, 1, dtype=torch.float64)], 1)
    p_bin = cdf.diff(dim=1).reshape(n, 5, 2).sum(dim=2)
    bins = torch.tensor([TASK.bin_index(v) for v in labels.tolist()])
    return cal.HeldOut(p_bin.clamp_min(1e-12).log(), mu, labels, bins, f"regressed seed {seed}")


def test_per_bin_conformal_covers_every_bin_where_global_misses_the_hard_one() -> None:
    calib, test = regressed_held(1000, seed=1), regressed_held(2000, seed=2)
    coverage = {}
    for mode in ("global", "per-bin"):
        result = cal.calibrate(calib, TASK, conformal=mode)
        summary = cal.conformal_summary(test, result.rule(), TASK)
        assert abs(summary["interval_coverage"] - 0.9) < 0.06  # both hold on average
        coverage[mode] = [(row["interval_coverage"], row["set_coverage"]) for row in summary["per_bin"]]
    # global: the regressed top bin is covered in under half of its images; per-bin: every bin near 0.9
    assert coverage["global"][4][0] < 0.5 and coverage["global"][4][1] < 0.5
    assert all(interval >= 0.85 and bin_set >= 0.85 for interval, bin_set in coverage["per-bin"])


def test_per_bin_intervals_are_the_hull_of_each_bins_reach() -> None:
    extents = tuple(TASK.extents())  # [1, 2.5), [2.5, 4.5), [4.5, 6.5), [6.5, 8.5), [8.5, 10]
    rule = conformal.ConformalRule(0.9, (0.2, math.inf, 0.0, 1.0, 0.5), (0.5,) * 5, extents)
    low, high = rule.intervals(torch.tensor([5.0, 8.0, 12.0]), TASK.low, TASK.high)
    # 5: bin 1 always (inf), bin 2 only 5 itself; 8: bins 1, 3 ([7, 8.5]) and 4 (8.5); 12 counts as 10
    assert low.tolist() == [2.5, 2.5, 2.5] and high.tolist() == [5.0, 8.5, 10.0]
    g = torch.Generator().manual_seed(0)
    q = torch.rand(5, generator=g).double() * 3
    rule = conformal.ConformalRule(0.9, tuple(q.tolist()), (0.5,) * 5, extents)
    values, labels = torch.rand(500, generator=g).double() * 9 + 1, torch.randint(1, 11, (500,), generator=g)
    low, high = rule.intervals(values, TASK.low, TASK.high)
    within = (labels - values).abs() <= q[[TASK.bin_index(v) for v in labels.tolist()]]
    assert bool(within.any()) and bool(((low <= labels) & (labels <= high))[within].all())  # the guarantee's step


def test_per_bin_sets_hold_every_bin_within_its_own_threshold() -> None:
    torch.manual_seed(4)
    probs = torch.distributions.Dirichlet(torch.full((5,), 0.7)).sample((400,)).double()
    thresholds = (0.2, 0.9, 0.5, 0.0, 0.7)
    low, high = conformal.contiguous_sets(probs, thresholds)
    scores = conformal.bin_scores(probs)
    inside = (low[:, None] <= torch.arange(5)) & (torch.arange(5) <= high[:, None])
    assert bool(inside[scores <= torch.tensor(thresholds, dtype=torch.float64)].all())
    assert bool(inside[torch.arange(400), probs.argmax(dim=1)].all())
    for ends in (low, high):  # the hull is tight: both ends are bins within their thresholds
        assert bool((scores.gather(1, ends[:, None]).squeeze(1) <= torch.tensor(thresholds)[ends]).all())


def test_per_bin_calibration_round_trips_and_damage_is_caught(tmp_path: Path) -> None:
    calib = regressed_held(600, seed=5)
    result = cal.calibrate(calib, TASK, conformal="per-bin", coverage=0.95)
    stored = json.loads(json.dumps(result.to_metadata()))  # strict JSON: no infinity anywhere
    assert stored["version"] == 2 and stored["conformal"] == "per-bin" and len(stored["quantiles"]["interval"]) == 5
    again = cal.Calibration.from_metadata(stored)
    assert again.rule(0.8) == result.rule(0.8) and again.rule() == result.rule()
    temperature, rule = cal.prediction_settings(stored, 0.9)
    assert rule == result.rule(0.9) and rule.mode == "per-bin"
    # the top bin has 41 fitted samples: enough for 0.95 (19), not for 0.99 (99): always in the interval
    assert math.isinf(result.rule(0.99).interval_quantiles[4]) and math.isfinite(rule.interval_quantiles[4])
    with pytest.raises(CheckpointError, match="thresholds for 5 bins, the model 4"):
        rule.bin_sets(torch.zeros(3, 4))  # a checkpoint whose task lost a bin
    for damage in ({"extents": stored["extents"][:4]}, {"scores_by_bin": {"interval": [[]] * 5, "set": [[]] * 5}},
                   {"scores": {"interval": [-1.0] * stored["n"], "set": stored["scores"]["set"]}}):
        with pytest.raises(CheckpointError, match="damaged calibration metadata"):
            cal.Calibration.from_metadata({**stored, **damage})


def test_per_bin_with_too_few_images_in_a_bin_warns(splits) -> None:
    calib, _ = splits
    few_top = calib.subset((calib.bins < 4) | (torch.arange(len(calib)) < 40))  # a handful in the top bin
    result = cal.calibrate(few_top, TASK, conformal="per-bin")
    assert any("per-bin: bin(s) ['nine or ten'] have fewer than 9" in w for w in result.warnings)
    assert cal.thresholds(result.rule())["interval"][4] is None  # "always"


def test_reliability_diagram_is_a_png_of_the_expected_size(splits, tmp_path: Path) -> None:
    calib, _ = splits
    path = tmp_path / "reliability.png"
    plotting.save_reliability_diagram(path, calib, temperature=5.0, title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == plotting.PLOT_SIZE
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {plotting._BEFORE, plotting._AFTER} <= colours  # both curves are drawn


# ------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Disjoint synthetic splits: train + val (for training), calibration, test, and a too-small one."""
    root = tmp_path_factory.mktemp("cal-data")
    sizes = {"train": 200, "val": 40, "calib": 300, "test": 200, "tiny": 12}
    return {name: write_dataset("size", root / name, n=n, seed=seed).parent
            for seed, (name, n) in enumerate(sizes.items())}


@pytest.fixture(scope="module")
def overconfident(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """numclip-tiny trained 2 epochs on 200 size images, then with its logit scale multiplied by 5."""
    from numclip_cli.backbone import load_backbone
    from numclip_cli.datasets import load_samples
    from numclip_cli.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cal-model")
    config = TrainConfig(epochs=2, batch_size=16, lr=3e-3, image_lr=1e-3, tune_context=True, workers=0, seed=0)
    trainer = Trainer(load_backbone("numclip-tiny", "none"), SIZE, config, torch.device("cpu"))
    trained = folder / "trained.safetensors"
    result = trainer.fit(load_samples(data["train"], SIZE), load_samples(data["val"], SIZE), trained)
    assert result.best["mae"] < 0.6 * result.baseline_mae  # a model worth calibrating
    ckpt = read_checkpoint(trained)
    ckpt.tensors["clip.logit_scale"] = ckpt.tensors["clip.logit_scale"] + math.log(OVERCONFIDENCE)
    assert ckpt.tensors["clip.logit_scale"].exp().item() < 100  # below CLIP's cap, so the ×5 is real
    path = folder / "overconfident.safetensors"
    write_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def calibrated(overconfident: Path, data: dict[str, Path], run_cli) -> dict[str, Any]:
    """`numclip calibrate` on the calibration split, writing a copy, a plot and the JSON report."""
    folder = overconfident.parent
    out, plot, report = folder / "calibrated.safetensors", folder / "reliability.png", folder / "report.json"
    result = run_cli(["calibrate", "--checkpoint", overconfident, "--data", data["calib"], "--out", out,
                      "--plot", plot, "--json", report, "--ece-bins", "10", "--workers", "0", *CPU])
    assert result.exit_code == 0, result.stderr
    return {"path": out, "plot": plot, "report": json.loads(report.read_text()), "result": result}


@pytest.mark.slow
def test_calibrate_command_lowers_ece_and_nll(calibrated: dict[str, Any], overconfident: Path) -> None:
    report = calibrated["report"]
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert report["temperature"] > 1.5  # the ×5 is undone, at least in part
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    assert after["mae"] == before["mae"] and after["accuracy"] == before["accuracy"]
    assert report["n"] == 300 and report["n_fit"] + report["n_check"] == 300 and report["conformal"]["coverage"] == 0.9
    achieved = report["achieved"]  # on the quarter of the images the fit never saw
    assert achieved["n"] == report["n_check"] and report["metrics_on"] == "held-out"
    for key in ("interval_coverage", "set_coverage"):
        assert abs(achieved[key] - 0.9) < 3 * achieved["standard_error"] + 0.02
    assert len(achieved["per_bin"]) == 5 and sum(row["n"] for row in achieved["per_bin"]) == achieved["n"]
    assert {"mae_levels", "qwk", "one_off", "rank_accuracy", "cs@1"} <= set(before)
    stdout = " ".join(calibrated["result"].stdout.split())
    assert "ECE (10 bins)" in stdout and "before (T = 1)" in stdout and "MAE in levels (Σ p·k)" in stdout
    assert f"achieved on {achieved['n']} held-out image(s)" in stdout and "set cov." in stdout
    assert read_checkpoint(overconfident).calibration is None  # --out leaves the input alone
    stored = read_checkpoint(calibrated["path"]).calibration
    assert stored["temperature"] == report["temperature"] and len(stored["scores"]["set"]) == report["n_fit"]
    assert stored["achieved"] == achieved
    with Image.open(calibrated["plot"]) as image:
        assert image.format == "PNG" and image.size == plotting.PLOT_SIZE


@pytest.mark.slow
def test_calibrated_probabilities_on_the_test_split_are_better(calibrated, overconfident, data) -> None:
    from numclip_cli.datasets import load_samples
    from numclip_cli.evaluation import collect
    from numclip_cli.factory import create_model_and_transforms
    from numclip_cli.predictor import Predictor

    loaded = create_model_and_transforms(checkpoint=calibrated["path"])
    held = collect(Predictor(loaded.model, torch.device("cpu")), load_samples(data["test"], SIZE),
                   loaded.transform, batch_size=64, workers=0)
    t = calibrated["report"]["temperature"]
    assert cal.calibration_metrics(held, SIZE, t)["nll"] < cal.calibration_metrics(held, SIZE, 1.0)["nll"]
    assert cal.calibration_metrics(held, SIZE, t)["ece"] < cal.calibration_metrics(held, SIZE, 1.0)["ece"]


@pytest.mark.slow
def test_predict_in_a_subprocess_reports_intervals_and_bin_sets(calibrated, data, numclip_bin, clean_env) -> None:
    proc = subprocess.run([str(numclip_bin), "predict", str(data["test"]), "--recursive", "--checkpoint",
                           str(calibrated["path"]), "--coverage", "0.9", "--format", "jsonl", "--workers", "0",
                           *CPU], capture_output=True, text=True, env=clean_env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 200
    names = SIZE.bin_names
    hits = set_hits = 0
    for record in records:
        low, high = record["interval"]
        assert SIZE.low <= low <= record["value"] <= high <= SIZE.high and record["coverage"] == 0.9
        first = names.index(record["bin_set"][0])
        assert record["bin_set"] == names[first:first + len(record["bin_set"])]  # contiguous, in order
        assert record["bin"] in record["bin_set"]
        truth = float(Path(record["path"]).parent.name)
        hits += low <= truth <= high
        set_hits += names[SIZE.bin_index(truth)] in record["bin_set"]
    # 200 test images, 300 calibration images: loose bounds around 0.9 (the exact statistics are tested above)
    assert 0.8 <= hits / 200 <= 0.97 and 0.8 <= set_hits / 200 <= 0.97


@pytest.mark.slow
def test_predict_uses_the_calibrated_temperature(calibrated, overconfident, data, run_cli) -> None:
    images = sorted(str(p) for p in (data["test"] / "5").glob("*.png"))[:3]
    raw = run_cli(["predict", *images, "--checkpoint", overconfident, "--format", "jsonl", *CPU])
    tempered = run_cli(["predict", *images, "--checkpoint", calibrated["path"], "--format", "jsonl", *CPU])
    assert raw.exit_code == tempered.exit_code == 0, raw.stderr + tempered.stderr
    t = calibrated["report"]["temperature"]
    for a, b in zip(raw.stdout.splitlines(), tempered.stdout.splitlines(), strict=True):
        a, b = json.loads(a), json.loads(b)
        assert "interval" not in b  # only with --coverage
        # softmax(z / T) ** T ∝ softmax(z): undo the temperature (from the milder, less rounded side)
        undone = torch.tensor(list(b["probs"].values()), dtype=torch.float64) ** t
        torch.testing.assert_close(undone / undone.sum(), torch.tensor(list(a["probs"].values()),
                                                                       dtype=torch.float64), atol=2e-3, rtol=0)
        assert max(b["probs"].values()) < max(a["probs"].values())  # T > 1 flattens
        assert a["value"] == b["value"] and a["bin"] == b["bin"]


@pytest.mark.slow
def test_coverage_needs_a_calibrated_model(overconfident, calibrated, data, run_cli) -> None:
    image = str(next((data["test"] / "5").glob("*.png")))
    zero_shot = run_cli(["predict", image, "--task", str(data["test"] / "task.toml"), "--model", "numclip-tiny",
                         "--pretrained", "none", "--coverage", "0.9", *CPU])
    uncalibrated = run_cli(["predict", image, "--checkpoint", overconfident, "--coverage", "0.9", *CPU])
    for result in (zero_shot, uncalibrated):
        assert result.exit_code == 2 and "run `numclip calibrate" in result.stderr and not result.stdout
    too_sure = run_cli(["predict", image, "--checkpoint", calibrated["path"], "--coverage", "0.999", *CPU])
    n_fit = read_checkpoint(calibrated["path"]).calibration["n"]
    assert too_sure.exit_code == 2 and f"needs at least 999 calibration samples, there are {n_fit}" in too_sure.stderr


@pytest.mark.slow
def test_calibrate_rewrites_in_place_and_refuses_too_little_data(overconfident, data, run_cli, tmp_path) -> None:
    copy = tmp_path / "model.safetensors"
    shutil.copy(overconfident, copy)
    small = run_cli(["calibrate", "--checkpoint", copy, "--data", data["tiny"], "--workers", "0", *CPU])
    assert small.exit_code == 1 and "calibration needs at least 20" in small.stderr
    assert read_checkpoint(copy).calibration is None  # nothing written on error
    result = run_cli(["calibrate", "--checkpoint", copy, "--data", data["calib"], "--coverage", "0.8",
                      "--workers", "0", "-q", *CPU])
    assert result.exit_code == 0, result.stderr
    stored = read_checkpoint(copy).calibration
    assert stored["coverage"] == 0.8 and stored["data"] == str(data["calib"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left


@pytest.mark.parametrize("option, value", [("--coverage", "nan"), ("--coverage", "1"), ("--holdout", "1"),
                                           ("--holdout", "-0.1"), ("--holdout", "nan"), ("--conformal", "local")])
def test_bad_calibrate_options_are_usage_errors_before_any_work(run_cli, tmp_path: Path, option: str,
                                                                value: str) -> None:
    # neither file exists: a check that ran after loading would exit 1
    result = run_cli(["calibrate", "--checkpoint", tmp_path / "missing.safetensors", "--data", tmp_path / "none",
                      option, value, *CPU])
    assert result.exit_code == 2, result.output
    assert option in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_per_bin_calibration_from_the_command_line(overconfident, data, run_cli, tmp_path: Path) -> None:
    out, report = tmp_path / "per-bin.safetensors", tmp_path / "report.json"
    result = run_cli(["calibrate", "--checkpoint", overconfident, "--data", data["calib"], "--out", out,
                      "--conformal", "per-bin", "--holdout", "0.4", "--seed", "1", "--json", report, "--workers", "0",
                      *CPU])
    assert result.exit_code == 0, result.stderr
    report = json.loads(report.read_text())
    assert report["n_check"] == 120 and report["conformal"]["mode"] == "per-bin"
    assert len(report["conformal"]["interval"]) == 5 and report["achieved"]["mode"] == "per-bin"
    assert "± q" in result.stdout and "set ≤" in result.stdout
    stored = read_checkpoint(out).calibration
    assert stored["version"] == 2 and stored["holdout"]["seed"] == 1 and stored["achieved"] == report["achieved"]
    predicted = run_cli(["predict", str(data["test"]), "--recursive", "--checkpoint", out, "--coverage", "0.9",
                         "--format", "jsonl", "--workers", "0", *CPU])
    assert predicted.exit_code == 0, predicted.stderr
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    hits = sum(r["interval"][0] <= float(Path(r["path"]).parent.name) <= r["interval"][1] for r in records)
    assert len(records) == 200 and 0.75 <= hits / 200 <= 1.0


def test_non_finite_outputs_are_left_out_of_calibration(tiny_backbone, synthetic_dir: Path) -> None:
    from numclip_cli.datasets import load_samples
    from numclip_cli.evaluation import collect
    from numclip_cli.model.methods import create_model
    from numclip_cli.predictor import Predictor

    class Poisoned(Predictor):
        """Every third image gets a NaN value, every fifth a NaN logit; ``bad`` = all of them."""

        bad = False

        def predict_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {key: value.clone() for key, value in super().predict_images(images).items()}
            out["value"][::3] = math.nan
            out["bin_logits"][::5, 0] = math.nan
            if self.bad:
                out["value"][:] = math.inf
            return out

    samples = load_samples(synthetic_dir, TASK)
    predictor = Poisoned(create_model("numclip", tiny_backbone, TASK), torch.device("cpu"))
    held = collect(predictor, samples, tiny_backbone.preprocess, batch_size=64, workers=0)
    poisoned = set(range(0, 24, 3)) | set(range(0, 24, 5))
    assert held.nonfinite == len(poisoned) and len(held) == 24 - len(poisoned)
    assert bool(torch.isfinite(held.values).all()) and not bool(held.bin_logits.isnan().any())
    kept = [i for i in range(24) if i not in poisoned]
    assert held.targets.tolist() == [samples.values[i] for i in kept]  # labels stay with their rows
    twenty = cal.HeldOut(*(torch.cat([x] * 2) for x in (held.bin_logits, held.values, held.targets, held.bins)),
                         source="s", nonfinite=held.nonfinite)
    assert any(f"non-finite outputs (NaN/inf) for {len(poisoned)} image(s)" in w
               for w in cal.calibrate(twenty, TASK, holdout=0).warnings)
    predictor.bad = True
    with pytest.raises(DataError, match="non-finite outputs .* for all 24 readable image"):
        collect(predictor, samples, tiny_backbone.preprocess, batch_size=64, workers=0)
