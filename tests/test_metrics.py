"""Tests for numclip_cli.metrics beyond its doctests: textbook references, constructed cases, properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from numclip_cli import metrics
from numclip_cli.tasks import get_task

# torch's first call can be slow; the properties themselves are cheap.
FAST = settings(max_examples=60, deadline=None)

finite = st.floats(-1e3, 1e3, allow_nan=False)


def qwk_textbook(pred: list[int], true: list[int], num_classes: int) -> float:
    """Quadratic weighted kappa written out as the O(K^2) loop of the textbook definition."""
    n = len(pred)
    observed = [[0.0] * num_classes for _ in range(num_classes)]
    for p, t in zip(pred, true, strict=True):
        observed[t][p] += 1.0 / n
    true_hist = [sum(row) for row in observed]
    pred_hist = [sum(observed[i][j] for i in range(num_classes)) for j in range(num_classes)]
    num = den = 0.0
    for i in range(num_classes):
        for j in range(num_classes):
            w = (i - j) ** 2 / (num_classes - 1) ** 2
            num += w * observed[i][j]
            den += w * true_hist[i] * pred_hist[j]
    return 1.0 - num / den


def softmax_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return torch.softmax(torch.as_tensor(rng.normal(size=(n, k)) * 3), dim=1).numpy()


@pytest.mark.parametrize("num_classes", [2, 3, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwk_matches_textbook_loop(num_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, size=200)
    # Correlated predictions so kappa is far from 0, and clipped to stay in range.
    pred = np.clip(true + rng.integers(-1, 2, size=200), 0, num_classes - 1)
    for p in (pred, rng.integers(0, num_classes, size=200)):
        expected = qwk_textbook(p.tolist(), true.tolist(), num_classes)
        assert metrics.qwk(p, true, num_classes) == pytest.approx(expected, abs=1e-12)


def test_qwk_equals_covariance_identity() -> None:
    # For quadratic weights kappa = 2 cov(x, y) / (var x + var y + (mean x - mean y)^2).
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 7, size=300), rng.integers(0, 7, size=300)
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    expected = 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert metrics.qwk(x, y, 7) == pytest.approx(expected, abs=1e-12)


def test_qwk_perfect_reversed_and_degenerate() -> None:
    assert metrics.qwk([0, 1, 2, 3], [0, 1, 2, 3], 4) == 1.0
    assert metrics.qwk([3, 2, 1, 0], [0, 1, 2, 3], 4) == pytest.approx(-1.0)
    # Both raters always say the same single class: no expected disagreement, none observed either.
    assert metrics.qwk([2, 2, 2], [2, 2, 2], 5) == 1.0
    assert metrics.qwk([0, 0], [0, 0], 1) == 1.0


@FAST
@given(st.integers(1, 6), st.data())
def test_qwk_bounded(num_classes: int, data: st.DataObject) -> None:
    index = st.integers(0, num_classes - 1)
    pairs = data.draw(st.lists(st.tuples(index, index), min_size=1, max_size=40))
    pred, true = zip(*pairs, strict=True)
    assert -1.0 - 1e-9 <= metrics.qwk(list(pred), list(true), num_classes) <= 1.0 + 1e-9


def test_ece_zero_when_calibrated_by_construction() -> None:
    # 4 samples at confidence 0.75 with 3 right, 20 at 0.95 with 19 right: every bin's accuracy = confidence.
    probs = [[0.75, 0.25]] * 4 + [[0.05, 0.95]] * 20
    true = [0, 0, 0, 1] + [1] * 19 + [0]
    assert metrics.ece(probs, true, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    # Uniform over 4 classes, argmax picks class 0, which is right a quarter of the time.
    assert metrics.ece(torch.full((8, 4), 0.25), [0, 1, 2, 3] * 2) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_weighted_gap_of_reliability_bins() -> None:
    rng = np.random.default_rng(4)
    probs, true = softmax_rows(rng, 500, 6), rng.integers(0, 6, size=500)
    conf, acc, count = metrics.reliability_bins(probs, true, n_bins=12)
    assert len(conf) == len(acc) == len(count) == 12 and sum(count) == 500
    expected = sum(c * abs(a - f) for f, a, c in zip(conf, acc, count, strict=True) if c) / 500
    assert metrics.ece(probs, true, n_bins=12) == pytest.approx(expected, abs=1e-12)
    # A single bin reduces ECE to |overall accuracy - mean confidence|.
    top = probs.max(axis=1)
    single = abs(np.mean(probs.argmax(axis=1) == true) - top.mean())
    assert metrics.ece(probs, true, n_bins=1) == pytest.approx(single, abs=1e-12)


def test_reliability_bins_marks_empty_bins() -> None:
    conf, acc, count = metrics.reliability_bins([[0.95, 0.05]], [0], n_bins=4)
    assert count == [0, 0, 0, 1]
    assert all(math.isnan(v) for v in conf[:3] + acc[:3])
    assert (conf[3], acc[3]) == (pytest.approx(0.95), 1.0)


def test_rps_bounds_and_extremes() -> None:
    rng = np.random.default_rng(5)
    for k in (2, 3, 8):
        value = metrics.rps(softmax_rows(rng, 100, k), rng.integers(0, k, size=100))
        assert 0.0 <= value <= 1.0
        assert metrics.rps(np.eye(k), np.arange(k)) == 0.0
        # All mass on the far end from the truth is the worst case.
        assert metrics.rps([[0.0] * (k - 1) + [1.0]], [0]) == pytest.approx(1.0)
    assert metrics.rps([[1.0]], [0]) == 0.0


def test_brier_perfect_worst_and_uniform() -> None:
    assert metrics.brier(np.eye(5), np.arange(5)) == 0.0
    assert metrics.brier([[0.0, 1.0, 0.0]], [0]) == pytest.approx(2.0)
    # Uniform over K: (1 - 1/K)^2 + (K - 1) / K^2 = 1 - 1/K.
    assert metrics.brier(torch.full((3, 4), 0.25), [0, 1, 3]) == pytest.approx(0.75)


def test_nll_matches_log_softmax() -> None:
    rng = np.random.default_rng(6)
    logits, true = rng.normal(size=(50, 7)), rng.integers(0, 7, size=50)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert metrics.nll(logits, true) == pytest.approx(-log_probs[np.arange(50), true].mean(), abs=1e-12)
    assert metrics.nll(torch.zeros(4, 9), [0, 3, 5, 8]) == pytest.approx(math.log(9))


def test_readouts() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    assert metrics.expected_index(probs).tolist() == pytest.approx([1.6, 0.5])
    assert metrics.argmax_index(probs).tolist() == [2, 0]
    assert metrics.expected_index(probs.double()).dtype == torch.float64


def test_accepts_numpy_tensors_and_float32_alike() -> None:
    pred, target = [1.5, 2.0, 7.0], [1.0, 2.0, 3.0]
    expected = metrics.mae(pred, target)
    assert metrics.mae(np.array(pred), torch.tensor(target, dtype=torch.float32)) == pytest.approx(expected)
    assert metrics.accuracy(torch.tensor([1, 2]), np.array([1, 3])) == 0.5


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.mae([[1.0], [2.0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        metrics.mae([], [])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.qwk([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="rows but"):
        metrics.brier([[0.5, 0.5]], [0, 1])


def test_summarize_reports_task_units_and_levels() -> None:
    """HCI: MAE in years of the fine value, level MAE of Σ p_k·k (what the HCI papers report), argmax accuracy,
    CS@L in years for the spec's tolerances; the argmax readout of rank methods adds ``mae_max``."""
    task = get_task("hci")
    probs = [[0.8, 0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0]]
    base = metrics.summarize(task, [1936.0, 1969.0], [1934.0, 1955.0], probs)
    assert list(base) == ["mae", "mae_levels", "mae_levels_max", "accuracy", "rank_accuracy", "one_off", "qwk",
                          "rps", "cs@5", "cs@10"]
    assert base["mae"] == pytest.approx(8.0)  # (2 + 14) / 2 years
    assert base["mae_levels"] == pytest.approx((0.2 + 0.5) / 2)  # expected index 0.2 vs 0, 2.5 vs 2
    assert base["mae_levels_max"] == 0.0 and base["accuracy"] == base["rank_accuracy"] == 1.0  # ties: lower bin
    assert (base["cs@5"], base["cs@10"]) == (0.5, 0.5)
    full = metrics.summarize(task, [1936.0, 1969.0], [1934.0, 1955.0], probs, value_max=[1934.5, 1954.5])
    assert full["mae_max"] == pytest.approx(0.5)


def test_summarize_rank_accuracy_uses_the_nearest_integer_rank_of_the_fine_value() -> None:
    """Age: ``accuracy`` is the coarse 5-bin accuracy (the reference's age accuracy), ``rank_accuracy`` exact years."""
    task = get_task("age")
    probs = [[0.0, 0.0, 1.0, 0.0, 0.0]] * 3
    out = metrics.summarize(task, [30.4, 30.6, 20.0], [30.0, 30.0, 30.0], probs)
    assert out["accuracy"] == 1.0 and out["rank_accuracy"] == pytest.approx(1 / 3)
    assert out["cs@5"] == pytest.approx(2 / 3) and out["mae_levels"] == 0.0


@FAST
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=30), st.floats(0, 100), st.floats(0, 100))
def test_cs_at_monotone_in_l(pairs: list[tuple[float, float]], a: float, b: float) -> None:
    pred, target = zip(*pairs, strict=True)
    low, high = sorted((a, b))
    assert 0.0 <= metrics.cs_at(pred, target, low) <= metrics.cs_at(pred, target, high) <= 1.0


@FAST
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=30))
def test_mae_symmetric_and_nonnegative(pairs: list[tuple[float, float]]) -> None:
    pred, target = zip(*pairs, strict=True)
    assert metrics.mae(pred, target) == metrics.mae(target, pred) >= 0.0
    assert metrics.mae(pred, pred) == 0.0


@FAST
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=30))
def test_index_accuracies_ordered(pairs: list[tuple[int, int]]) -> None:
    pred, true = zip(*pairs, strict=True)
    exact = metrics.accuracy(pred, true)
    assert exact == metrics.cs_at(pred, true, 0)
    assert exact <= metrics.one_off_accuracy(pred, true) <= metrics.cs_at(pred, true, 2)
