"""Metrics for ordinal prediction: errors, agreement (QWK), ranked scores and calibration.

Every function accepts anything ``torch.as_tensor`` accepts, computes in float64 without Python loops over
samples and returns a Python float (the two readouts return tensors). ``probs`` and ``logits`` are ``(N, K)``
rows over ordered bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from numclip_cli.tasks import TaskSpec

TensorLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]


def _values(pred: TensorLike, target: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shaped, non-empty float64 tensors (no silent broadcasting of (N, 1) against (N,))."""
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    if p.numel() == 0:
        raise ValueError("metrics need at least one sample")
    return p, t


def _indices(index: TensorLike, num_classes: int) -> torch.Tensor:
    """A 1-D int64 tensor of class indices, checked to lie in [0, num_classes)."""
    i = torch.as_tensor(index).long().reshape(-1)
    if i.numel() and (i.min() < 0 or i.max() >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    return i


def _rows_and_index(rows: TensorLike, true_index: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 (N, K) matrix of probabilities or logits and its N checked true class indices."""
    p = torch.as_tensor(rows, dtype=torch.float64)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"expected non-empty (N, K) rows, got shape {tuple(p.shape)}")
    t = _indices(true_index, p.shape[1])
    if t.numel() != p.shape[0]:
        raise ValueError(f"{p.shape[0]} rows but {t.numel()} true indices")
    return p, t


def mae(pred: TensorLike, target: TensorLike) -> float:
    """Mean absolute error.

    >>> mae([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])
    1.0
    """
    p, t = _values(pred, target)
    return (p - t).abs().mean().item()


def cs_at(pred: TensorLike, target: TensorLike, L: float) -> float:
    """Cumulative score CS@L: share of samples with |error| <= L.

    >>> round(cs_at([20, 25, 31], [22, 30, 31], 3), 4)
    0.6667
    """
    p, t = _values(pred, target)
    return ((p - t).abs() <= L).double().mean().item()


def accuracy(pred_index: TensorLike, true_index: TensorLike) -> float:
    """Exact accuracy of integer class indices.

    >>> accuracy([0, 1, 2, 2], [0, 1, 1, 2])
    0.75
    """
    p, t = _values(pred_index, true_index)
    return (p.long() == t.long()).double().mean().item()


def one_off_accuracy(pred_index: TensorLike, true_index: TensorLike) -> float:
    """Share of class indices at most one bin away from the truth.

    >>> one_off_accuracy([0, 3, 2, 2], [0, 1, 1, 2])
    0.75
    """
    return cs_at(pred_index, true_index, 1)


def qwk(pred_index: TensorLike, true_index: TensorLike, num_classes: int) -> float:
    """Quadratic weighted Cohen's kappa (1 = perfect agreement, 0 = chance, -1 = perfect disagreement).

    >>> round(qwk([0, 1, 2, 2], [0, 1, 2, 1], num_classes=3), 4)
    0.8
    """
    _values(pred_index, true_index)  # shape and emptiness checks
    p, t = _indices(pred_index, num_classes), _indices(true_index, num_classes)
    observed = torch.bincount(t * num_classes + p, minlength=num_classes**2)
    observed = observed.reshape(num_classes, num_classes).double()
    expected = torch.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    ranks = torch.arange(num_classes, dtype=torch.float64)
    # The usual 1/(K-1)^2 weight normalisation cancels in the ratio; leaving it out also covers K = 1.
    weights = (ranks[:, None] - ranks[None, :]) ** 2
    disagreement_observed = (weights * observed).sum().item()
    disagreement_expected = (weights * expected).sum().item()
    if disagreement_expected == 0:
        return 1.0 if disagreement_observed == 0 else 0.0
    return 1.0 - disagreement_observed / disagreement_expected


def rps(probs: TensorLike, true_index: TensorLike) -> float:
    """Ranked probability score: mean squared gap between predicted and true CDFs, scaled to [0, 1].

    >>> rps([[0.5, 0.5, 0.0]], [1])
    0.125
    """
    p, t = _rows_and_index(probs, true_index)
    num_classes = p.shape[1]
    cdf_pred = p.cumsum(dim=1)[:, :-1]
    cdf_true = (torch.arange(num_classes - 1)[None, :] >= t[:, None]).double()
    return ((cdf_pred - cdf_true) ** 2).sum(dim=1).mean().item() / max(num_classes - 1, 1)


def expected_index(probs: TensorLike) -> torch.Tensor:
    """Expectation readout: sum_k p_k * k per row.

    >>> expected_index([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    tensor([0.5000, 2.0000])
    """
    p = torch.as_tensor(probs)
    p = p if p.is_floating_point() else p.float()
    return p @ torch.arange(p.shape[-1], dtype=p.dtype, device=p.device)


def argmax_index(probs: TensorLike) -> torch.Tensor:
    """Argmax readout: the most probable class index per row (ties go to the lower bin).

    >>> argmax_index([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    tensor([0, 2])
    """
    return torch.as_tensor(probs).argmax(dim=-1)


def nll(logits: TensorLike, true_index: TensorLike) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits).

    >>> round(nll([[0.0, 0.0]], [1]), 4)
    0.6931
    """
    z, t = _rows_and_index(logits, true_index)
    return F.cross_entropy(z, t).item()


def brier(probs: TensorLike, true_index: TensorLike) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_k - onehot_k)^2, in [0, 2].

    >>> brier([[0.5, 0.5]], [0])
    0.5
    """
    p, t = _rows_and_index(probs, true_index)
    onehot = F.one_hot(t, p.shape[1]).double()
    return ((p - onehot) ** 2).sum(dim=1).mean().item()


def _bin_stats(
    probs: TensorLike, true_index: TensorLike, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin mean top-class confidence, accuracy (NaN where empty) and count, bins (i/n, (i+1)/n]."""
    p, t = _rows_and_index(probs, true_index)
    confidence, predicted = p.max(dim=1)
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)
    count = torch.bincount(bins, minlength=n_bins)
    confidence_mean = torch.bincount(bins, weights=confidence, minlength=n_bins) / count
    correct = (predicted == t).double()
    accuracy_mean = torch.bincount(bins, weights=correct, minlength=n_bins) / count
    return confidence_mean, accuracy_mean, count


def reliability_bins(
    probs: TensorLike, true_index: TensorLike, n_bins: int = 15
) -> tuple[list[float], list[float], list[int]]:
    """Per-bin (mean confidence, accuracy, count) of the top class, equal-width bins; NaN marks empty bins.

    >>> reliability_bins([[0.9, 0.1], [0.3, 0.7], [0.45, 0.55]], [0, 0, 1], n_bins=5)
    ([nan, nan, 0.55, 0.7, 0.9], [nan, nan, 1.0, 0.0, 1.0], [0, 0, 1, 1, 1])
    """
    confidence_mean, accuracy_mean, count = _bin_stats(probs, true_index, n_bins)
    return confidence_mean.tolist(), accuracy_mean.tolist(), count.tolist()


def ece(probs: TensorLike, true_index: TensorLike, n_bins: int = 15) -> float:
    """Expected calibration error of the top class: sum_b |B_b|/n * |acc_b - conf_b|.

    >>> round(ece([[0.9, 0.1], [0.3, 0.7], [0.45, 0.55]], [0, 0, 1], n_bins=5), 4)
    0.4167
    """
    confidence_mean, accuracy_mean, count = _bin_stats(probs, true_index, n_bins)
    gap = torch.where(count > 0, (accuracy_mean - confidence_mean).abs(), 0.0)
    return ((count * gap).sum() / count.sum()).item()


def summarize(
    task: TaskSpec,
    value: TensorLike,
    target: TensorLike,
    probs: TensorLike,
    value_max: TensorLike | None = None,
) -> dict[str, float]:
    """Held-out metrics in the units the papers report, for ``train``, ``calibrate`` and ``bench``.

    * ``mae`` of the fine value in the task unit (``mae_max``: the argmax readout of rank methods);
    * ``mae_levels`` of the expected bin index Σ p_k·k against the true bin index, in level units (what the
      HCI and aesthetics papers call MAE), and ``mae_levels_max`` of the most probable bin;
    * ``accuracy`` of the most probable bin: exact-level accuracy for 5-level tasks, coarse-bin accuracy for
      age (what the NumCLIP reference calls age accuracy); ``rank_accuracy``: the fine value's nearest integer
      rank is the label's (for ``ranks = "bins"`` tasks it is ``accuracy``);
    * ``one_off`` and ``qwk`` of the most probable bin, ``rps`` of the bin probabilities;
    * ``cs@L`` (share of fine values within L of the label) for every L of the task's ``cs_at``.

    >>> from numclip_cli.tasks import task_from_dict
    >>> bins = [{"name": n, "low": low, "high": low + 1} for n, low in (("a", 0), ("b", 2), ("c", 4))]
    >>> task = task_from_dict({"name": "t", "prompt": "{}", "cs_at": [1], "bins": bins})
    >>> out = summarize(task, [1.0, 2.6], [1.0, 4.0], [[0.9, 0.1, 0.0], [0.0, 0.6, 0.4]])
    >>> {name: round(value, 4) for name, value in out.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'mae': 0.7, 'mae_levels': 0.35, 'mae_levels_max': 0.5, 'accuracy': 0.5, 'rank_accuracy': 0.5,
     'one_off': 1.0, 'qwk': 0.6667, 'rps': 0.0925, 'cs@1': 0.5}
    """
    v, t = _values(value, target)
    # the bin whose extent holds each label (tasks.TaskSpec.bin_index, vectorised)
    boundaries = torch.tensor(task.boundaries(), dtype=torch.float64)
    p, true_bins = _rows_and_index(probs, torch.bucketize(t, boundaries, right=True))
    pred_bins = argmax_index(p)
    out = {"mae": mae(v, t)}
    if value_max is not None:
        out["mae_max"] = mae(value_max, t)
    out["mae_levels"] = mae(expected_index(p), true_bins)
    out["mae_levels_max"] = mae(pred_bins, true_bins)
    out["accuracy"] = accuracy(pred_bins, true_bins)
    if task.ranks == "bins":
        out["rank_accuracy"] = out["accuracy"]
    else:
        ranks = torch.tensor(task.rank_values(), dtype=torch.float64)
        nearest = (v[:, None] - ranks).abs().argmin(dim=1), (t[:, None] - ranks).abs().argmin(dim=1)
        out["rank_accuracy"] = accuracy(*nearest)
    out["one_off"] = one_off_accuracy(pred_bins, true_bins)
    out["qwk"] = qwk(pred_bins, true_bins, p.shape[1])
    out["rps"] = rps(p, true_bins)
    for tolerance in task.cs_at:
        out[f"cs@{tolerance:g}"] = cs_at(v, t, tolerance)
    return out
