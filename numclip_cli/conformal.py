"""Split conformal prediction for ordinal outputs: an interval for the fine value and a contiguous set of bins.

Split conformal prediction (Vovk et al. 2005; Angelopoulos & Bates, *A Gentle Introduction to Conformal
Prediction*, 2021): with scores s_1..s_n on held-out data and coverage 1−α, the threshold is the k-th smallest
score, k = ⌈(n+1)(1−α)⌉, which covers a new *exchangeable* sample with probability ≥ 1−α. Exchangeable means
"drawn like the calibration images": the guarantee says nothing about images of another kind.

* The fine value gets the interval ŷ ± q from absolute residuals |y − ŷ|.
* The bins get a **contiguous** set: start at the most probable bin and grow towards the more probable
  neighbour; a bin's score is the probability already in the set just before it joins (an ordinal form of APS,
  Romano et al., NeurIPS 2020), and the set holds every bin whose score is at most the threshold.

Two modes:

* ``global``: one threshold for all images. Coverage holds on average over images; images of a bin the model
  finds hard may be covered less often, those of an easy bin more often.
* ``per-bin`` (class-conditional or *Mondrian* conformal, Vovk et al. 2005 ch. 4; Sadinle et al. 2019): a
  threshold q_k per true bin k, from the calibration images of that bin. Bin k's values are in the interval
  when |y − ŷ| ≤ q_k, so the interval is the hull of ``extent_k ∩ [ŷ − q_k, ŷ + q_k]`` over the bins, and the
  set the hull of the bins whose score is at most their own threshold. Coverage then holds *within every
  bin*: intervals widen where the model is unsure. A bin with too few calibration images for the coverage
  gets an infinite threshold (it is always in the set and its whole extent reachable), which keeps its
  guarantee at the price of width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from numclip_cli.errors import CheckpointError, UsageError

MODES = ("global", "per-bin")


def check_coverage(coverage: float) -> None:
    """Coverage is a probability strictly between 0 and 1."""
    if not 0 < coverage < 1:
        raise UsageError(f"--coverage must be between 0 and 1 (e.g. 0.9), got {coverage:g}")


def check_mode(mode: str) -> None:
    """The conformal mode is one of ``MODES``."""
    if mode not in MODES:
        raise UsageError(f"--conformal must be one of {', '.join(MODES)}, got {mode!r}")


def min_samples_for(coverage: float) -> int:
    """The smallest n with ⌈(n+1)·coverage⌉ ≤ n.

    >>> min_samples_for(0.9), min_samples_for(0.99)
    (9, 99)
    """
    return math.ceil(coverage / (1 - coverage) - 1e-9)


def _rank(n: int, coverage: float) -> int:
    """k = ⌈(n+1)·coverage⌉, the rank of the conformal threshold among n sorted scores."""
    check_coverage(coverage)
    # the epsilon keeps (n+1)·coverage = 18.000000000000004 from rounding up to 19
    return max(math.ceil((n + 1) * coverage - 1e-9), 1)


def conformal_quantile(scores: Sequence[float] | torch.Tensor, coverage: float) -> float:
    """The finite-sample conformal threshold: the ⌈(n+1)·coverage⌉-th smallest score.

    >>> conformal_quantile(list(range(1, 20)), 0.9)  # n = 19: k = ⌈20 · 0.9⌉ = 18
    18.0
    """
    ordered = sorted(float(s) for s in scores)
    k = _rank(len(ordered), coverage)
    if k > len(ordered):
        raise UsageError(f"coverage {coverage:g} needs at least {min_samples_for(coverage)} calibration samples, "
                         f"there are {len(ordered)}: lower --coverage or calibrate on more data")
    return ordered[k - 1]


def bin_quantile(scores: Sequence[float], coverage: float) -> float:
    """``conformal_quantile`` of one bin's scores, or infinity when the bin has too few for the coverage.

    >>> bin_quantile([0.5] * 9, 0.9), bin_quantile([0.5] * 8, 0.9)
    (0.5, inf)
    """
    k = _rank(len(scores), coverage)
    return math.inf if k > len(scores) else sorted(float(s) for s in scores)[k - 1]


def bin_probs(bin_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float64: set scores and sets must see the same sums to the last bit."""
    return (bin_logits.double() / temperature).softmax(dim=-1)


def interval_scores(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Absolute residuals |y − ŷ|."""
    return (targets.double() - values.double()).abs()


def _growth(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grow a contiguous set from the argmax bin, one bin per step, towards the more probable neighbour.

    Returns ``low``, ``high`` (N×K: the set after step j is bins low[:, j]..high[:, j]) and ``before`` (N×K:
    the probability already in the set when step j adds its bin; 0 for the argmax). Ties go to the lower bin.
    """
    p = probs.double()
    n, k = p.shape
    rows = torch.arange(n)
    low = high = p.argmax(dim=1)
    lows, highs, befores = [low], [high], [torch.zeros(n, dtype=torch.float64)]
    mass = p[rows, low]
    for _ in range(k - 1):
        left = torch.where(low > 0, p[rows, (low - 1).clamp(min=0)], -1.0)
        right = torch.where(high < k - 1, p[rows, (high + 1).clamp(max=k - 1)], -1.0)
        go_left = left >= right
        befores.append(mass)
        low = torch.where(go_left, low - 1, low)
        high = torch.where(go_left, high, high + 1)
        mass = mass + torch.where(go_left, left, right)
        lows.append(low)
        highs.append(high)
    return torch.stack(lows, 1), torch.stack(highs, 1), torch.stack(befores, 1)


def bin_scores(probs: torch.Tensor) -> torch.Tensor:
    """N×K: for every bin, the probability already in the grown set just before that bin joins it.

    Along the growth order the scores only increase, so the bins scoring at most a threshold are a contiguous
    run around the argmax (score 0).

    >>> bin_scores(torch.tensor([[0.1, 0.6, 0.3]]))
    tensor([[0.9000, 0.0000, 0.6000]], dtype=torch.float64)
    """
    low, high, before = _growth(probs)
    # the bin each step adds: the new lower end when the set grew down, else the new upper end
    added = torch.cat([low[:, :1], torch.where(low[:, 1:] < low[:, :-1], low[:, 1:], high[:, 1:])], dim=1)
    return torch.empty_like(before).scatter_(1, added, before)


def set_scores(probs: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """Per sample, the probability in the grown set just before the true bin joins it.

    >>> set_scores(torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]]), torch.tensor([1, 0]))
    tensor([0.0000, 0.9000], dtype=torch.float64)
    """
    return bin_scores(probs).gather(1, true_index.long()[:, None]).squeeze(1)


def contiguous_sets(probs: torch.Tensor, thresholds: float | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last bin of each sample's set: the hull of the bins whose score is at most their threshold.

    ``thresholds`` is one number (global) or one per bin (per-bin). A bin is in the set when its score
    (``bin_scores``) is at most its threshold; the argmax (score 0) always is.

    >>> contiguous_sets(torch.tensor([[0.1, 0.6, 0.3], [0.05, 0.05, 0.9]]), 0.85)
    (tensor([1, 2]), tensor([2, 2]))
    """
    scores = bin_scores(probs)
    limit = torch.as_tensor(thresholds, dtype=torch.float64).expand(scores.shape[1])
    inside = scores <= limit
    positions = torch.arange(scores.shape[1]).expand_as(scores)
    return (torch.where(inside, positions, scores.shape[1]).min(dim=1).values,
            torch.where(inside, positions, -1).max(dim=1).values)


@dataclass(frozen=True)
class ConformalRule:
    """Interval half-widths and set thresholds for one coverage: one of each (global) or one per bin."""

    coverage: float
    interval_quantiles: tuple[float, ...]
    set_thresholds: tuple[float, ...]
    extents: tuple[tuple[float, float], ...] | None = None  # the bins' value ranges (per-bin only)

    @property
    def mode(self) -> str:
        """``global`` or ``per-bin``."""
        return "global" if self.extents is None else "per-bin"

    def intervals(self, values: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper ends of each interval, inside the task range ``[low, high]``.

        Global: ŷ ± q, clipped (labels never lie outside the range, so clipping keeps the coverage). Per-bin:
        the hull of ``extent_k ∩ [ŷ − q_k, ŷ + q_k]`` over the bins that intersection leaves non-empty.
        """
        if self.extents is None:
            q = self.interval_quantiles[0]
            return (values - q).clamp(min=low, max=high), (values + q).clamp(min=low, max=high)
        # ŷ inside the range first: it then lies in some bin's extent, so the hull is never empty, and for any
        # label in range |y − clamp(ŷ)| ≤ |y − ŷ|, so covering the scored residual still covers the label
        v = values.double().clamp(min=low, max=high)[:, None]
        q = torch.tensor(self.interval_quantiles, dtype=torch.float64)
        starts, ends = torch.tensor(self.extents, dtype=torch.float64).unbind(dim=1)
        lows, highs = torch.maximum(v - q, starts), torch.minimum(v + q, ends)
        reached = lows <= highs
        return (torch.where(reached, lows, math.inf).min(dim=1).values.to(values.dtype),
                torch.where(reached, highs, -math.inf).max(dim=1).values.to(values.dtype))

    def bin_sets(self, bin_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last bin of each contiguous set (from probabilities at T = 1, as the scores were)."""
        if len(self.set_thresholds) not in (1, bin_logits.shape[-1]):
            raise CheckpointError(f"the calibration has thresholds for {len(self.set_thresholds)} bins, the model "
                                  f"{bin_logits.shape[-1]}: run `numclip calibrate` again")
        return contiguous_sets(bin_probs(bin_logits), self.set_thresholds)
