"""Calibration on held-out data: temperature scaling and split-conformal intervals and bin sets.

* **Temperature scaling** (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017): one scalar T
  divides the bin logits, chosen to minimise the NLL on held-out data. It changes probabilities, never the
  argmax bin or the fine value, so accuracy and MAE stay exactly as they were.
* **Split conformal prediction** (Vovk et al. 2005; Angelopoulos & Bates, *A Gentle Introduction to
  Conformal Prediction*, 2021): with scores s_1..s_n on held-out data and coverage 1−α, the threshold is the
  k-th smallest score, k = ⌈(n+1)(1−α)⌉, which covers a new exchangeable sample with probability ≥ 1−α.
  The fine value gets the interval ŷ ± q from absolute residuals |y − ŷ|. The bins get a **contiguous** set:
  start at the most probable bin and grow towards the more probable neighbour while the probability already
  in the set is at most the threshold; a sample's score is the probability in the set just before its true bin
  joins (an ordinal form of APS, Romano et al., NeurIPS 2020).

The set scores use the *uncalibrated* probabilities (T = 1): a temperature fitted for NLL is not the one that
gives the smallest sets, and conformal coverage holds for any fixed probabilities. The sorted raw scores are
stored in the checkpoint so another coverage can be served later without the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from numclip_cli import metrics
from numclip_cli.errors import CheckpointError, DataError, UsageError
from numclip_cli.tasks import TaskSpec

MIN_SAMPLES = 20  # below this a 90 % quantile is one of the last two scores: not worth storing
DEFAULT_COVERAGE = 0.9
CALIBRATION_VERSION = 1
TEMPERATURE_BOUNDS = (1e-2, 1e2)
_SEARCH_STEPS = 80  # golden-section steps on log T: the bracket shrinks to ~1e-16 of its width
_SCORE_DECIMALS = 6  # stored scores: enough for any quantile, keeps the metadata small


@dataclass
class HeldOut:
    """Model outputs on labelled held-out images (uncalibrated); ``evaluation.collect`` gathers them."""

    bin_logits: torch.Tensor  # N×K logits over the task's bins
    values: torch.Tensor  # N fine predictions in the task unit
    targets: torch.Tensor  # N labels in the task unit
    bins: torch.Tensor  # N true bin indices
    source: str = ""
    skipped: int = 0  # images that could not be decoded
    values_max: torch.Tensor | None = None  # N argmax-rank readouts (rank methods only)

    def __len__(self) -> int:
        return len(self.targets)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """Bin probabilities at a temperature."""
        return bin_probs(self.bin_logits, temperature)


def bin_probs(bin_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float64: set scores and sets must see the same sums to the last bit."""
    return (bin_logits.double() / temperature).softmax(dim=-1)


def fit_temperature(logits: torch.Tensor, true_index: torch.Tensor) -> float:
    """The T in ``TEMPERATURE_BOUNDS`` minimising NLL(softmax(logits / T)), by golden-section search on log T.

    NLL is convex in 1/T, so it has one minimum along log T and the bracketed search cannot stop at a
    wrong one (and, unlike an unbounded optimiser, stays finite on perfectly separated data).

    >>> z = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> fit_temperature(z, torch.tensor([0, 1, 1, 0])) > 10  # half wrong at high confidence: flatten
    True
    """
    z, target = logits.double(), true_index.long()

    def loss(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(z / math.exp(log_t), target).item()

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return math.exp((low + high) / 2)


def calibration_metrics(held: HeldOut, temperature: float, ece_bins: int = 15) -> dict[str, float]:
    """ECE, NLL, Brier, RPS at a temperature, with accuracy and MAE (which a temperature cannot change)."""
    probs = held.probs(temperature)
    return {"ece": metrics.ece(probs, held.bins, n_bins=ece_bins),
            "nll": metrics.nll(held.bin_logits.double() / temperature, held.bins),
            "brier": metrics.brier(probs, held.bins),
            "rps": metrics.rps(probs, held.bins),
            "accuracy": metrics.accuracy(metrics.argmax_index(probs), held.bins),
            "mae": metrics.mae(held.values, held.targets)}


# ------------------------------------------------------------------------------------------- conformal
def conformal_quantile(scores: Sequence[float] | torch.Tensor, coverage: float) -> float:
    """The finite-sample conformal threshold: the ⌈(n+1)·coverage⌉-th smallest score.

    >>> conformal_quantile(list(range(1, 20)), 0.9)  # n = 19: k = ⌈20 · 0.9⌉ = 18
    18.0
    """
    check_coverage(coverage)
    ordered = sorted(float(s) for s in scores)
    n = len(ordered)
    # the epsilon keeps (n+1)·coverage = 18.000000000000004 from rounding up to 19
    k = math.ceil((n + 1) * coverage - 1e-9)
    if k > n:
        raise UsageError(f"coverage {coverage:g} needs at least {min_samples_for(coverage)} calibration samples, "
                         f"there are {n}: lower --coverage or calibrate on more data")
    return ordered[max(k, 1) - 1]


def min_samples_for(coverage: float) -> int:
    """The smallest n with ⌈(n+1)·coverage⌉ ≤ n.

    >>> min_samples_for(0.9), min_samples_for(0.99)
    (9, 99)
    """
    return math.ceil(coverage / (1 - coverage) - 1e-9)


def check_coverage(coverage: float) -> None:
    """Coverage is a probability strictly between 0 and 1."""
    if not 0 < coverage < 1:
        raise UsageError(f"--coverage must be between 0 and 1 (e.g. 0.9), got {coverage:g}")


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


def set_scores(probs: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """Per sample, the probability in the grown set just before the true bin joins it.

    >>> set_scores(torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]]), torch.tensor([1, 0]))
    tensor([0.0000, 0.9000], dtype=torch.float64)
    """
    low, high, before = _growth(probs)
    t = true_index.long()[:, None]
    first = ((low <= t) & (t <= high)).double().argmax(dim=1)  # the step whose set first holds the true bin
    return before.gather(1, first[:, None]).squeeze(1)


def contiguous_sets(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last bin index of each sample's set: every growth step whose prior mass is ≤ ``threshold``.

    The true bin is in the set exactly when its score (``set_scores``) is ≤ ``threshold``.

    >>> contiguous_sets(torch.tensor([[0.1, 0.6, 0.3], [0.05, 0.05, 0.9]]), 0.85)
    (tensor([1, 2]), tensor([2, 2]))
    """
    low, high, before = _growth(probs)
    last = (before <= threshold).sum(dim=1, keepdim=True) - 1  # `before` only grows along the steps
    return low.gather(1, last).squeeze(1), high.gather(1, last).squeeze(1)


@dataclass(frozen=True)
class ConformalRule:
    """Interval half-width and set threshold for one coverage."""

    coverage: float
    interval_quantile: float
    set_threshold: float

    def intervals(self, values: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
        """ŷ ± q, clipped to the task range (labels never lie outside it, so clipping keeps the coverage)."""
        return ((values - self.interval_quantile).clamp(min=low, max=high),
                (values + self.interval_quantile).clamp(min=low, max=high))

    def bin_sets(self, bin_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last bin of each contiguous set (from probabilities at T = 1, as the scores were)."""
        return contiguous_sets(bin_probs(bin_logits), self.set_threshold)


@dataclass
class Calibration:
    """A fitted temperature and the conformal scores, as stored in a checkpoint's ``calibration`` metadata."""

    temperature: float
    coverage: float
    interval_scores: list[float]  # sorted |y − ŷ| on the calibration data
    set_scores: list[float]  # sorted set scores (uncalibrated probabilities)
    metrics: dict[str, dict[str, float]]  # "before" / "after" the temperature
    data: str
    ece_bins: int = 15
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of calibration samples."""
        return len(self.interval_scores)

    def rule(self, coverage: float | None = None) -> ConformalRule:
        """The interval and set thresholds at ``coverage`` (default: the calibrated one), from the stored scores."""
        coverage = self.coverage if coverage is None else coverage
        return ConformalRule(coverage, conformal_quantile(self.interval_scores, coverage),
                             conformal_quantile(self.set_scores, coverage))

    def to_metadata(self) -> dict[str, Any]:
        """Plain JSON data for the checkpoint."""
        rule = self.rule()
        return {"version": CALIBRATION_VERSION, "temperature": self.temperature, "coverage": self.coverage,
                "n": self.n, "quantiles": {"interval": rule.interval_quantile, "set": rule.set_threshold},
                "scores": {"interval": self.interval_scores, "set": self.set_scores},
                "set_probabilities": "uncalibrated", "metrics": self.metrics, "ece_bins": self.ece_bins,
                "data": self.data, "skipped": self.skipped, "warnings": self.warnings}

    @classmethod
    def from_metadata(cls, data: dict[str, Any], source: str = "checkpoint") -> Calibration:
        """Rebuild from checkpoint metadata; damaged metadata is a ``CheckpointError``."""
        try:
            if data["version"] != CALIBRATION_VERSION:
                raise ValueError(f"calibration version {data['version']!r} is not supported")
            calibration = cls(temperature=float(data["temperature"]), coverage=float(data["coverage"]),
                              interval_scores=[float(s) for s in data["scores"]["interval"]],
                              set_scores=[float(s) for s in data["scores"]["set"]], metrics=data["metrics"],
                              data=str(data["data"]), ece_bins=int(data["ece_bins"]),
                              skipped=int(data.get("skipped", 0)), warnings=list(data.get("warnings", [])))
            if not math.isfinite(calibration.temperature) or calibration.temperature <= 0:
                raise ValueError(f"temperature {calibration.temperature} is not a positive number")
            if len(calibration.set_scores) != calibration.n or calibration.n < MIN_SAMPLES:
                raise ValueError("score lists are missing or of different lengths")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: damaged calibration metadata ({exc}); run `numclip calibrate` "
                                  f"again") from None
        return calibration


NEEDS_CALIBRATION = ("--coverage needs a calibrated checkpoint: run `numclip calibrate --checkpoint FILE --data "
                     "HELD_OUT` first")


def prediction_settings(calibration: dict[str, Any] | None, coverage: float | None,
                        source: str = "checkpoint") -> tuple[float, ConformalRule | None]:
    """The temperature and (when ``coverage`` is asked for) conformal rule for a checkpoint's calibration."""
    if calibration is None:
        if coverage is not None:
            raise UsageError(NEEDS_CALIBRATION)
        return 1.0, None
    stored = Calibration.from_metadata(calibration, source)
    return stored.temperature, (None if coverage is None else stored.rule(coverage))


def calibrate(held: HeldOut, task: TaskSpec, coverage: float = DEFAULT_COVERAGE, ece_bins: int = 15,
              train_data: str | None = None) -> Calibration:
    """Fit the temperature and the conformal scores on held-out predictions; warnings go into the result."""
    check_coverage(coverage)
    if len(held) < MIN_SAMPLES:
        raise DataError(f"{len(held)} usable calibration image(s) in {held.source or 'the data'}: calibration "
                        f"needs at least {MIN_SAMPLES} (a few hundred for stable quantiles)")
    warnings = []
    if held.skipped:
        warnings.append(f"{held.skipped} unreadable image(s) in {held.source} were left out")
    counts = torch.bincount(held.bins, minlength=len(task.bins)).tolist()
    missing = [name for name, count in zip(task.bin_names, counts, strict=True) if count == 0]
    if missing:
        warnings.append(f"no calibration sample in bin(s) {missing}: coverage for images of those bins is not "
                        f"checked; calibrate on data that covers every bin")
    if train_data and Path(train_data).resolve() == Path(held.source).resolve():
        warnings.append(f"{held.source} is the checkpoint's training data: calibration needs held-out images "
                        f"or its probabilities and intervals will be over-confident")
    temperature = fit_temperature(held.bin_logits, held.bins)
    if not TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1] / 1.01:
        warnings.append(f"the temperature hit its search bound ({temperature:.3g}): the calibration data may be "
                        f"too easy or too small to calibrate on")
    result = Calibration(
        temperature=temperature, coverage=coverage,
        interval_scores=_stored(interval_scores(held.values, held.targets)),
        set_scores=_stored(set_scores(held.probs(), held.bins)),
        metrics={"before": calibration_metrics(held, 1.0, ece_bins),
                 "after": calibration_metrics(held, temperature, ece_bins)},
        data=held.source, ece_bins=ece_bins, skipped=held.skipped, warnings=warnings)
    result.rule()  # a coverage the data cannot support fails here, before anything is written
    return result


def _stored(scores: torch.Tensor) -> list[float]:
    """Sorted scores rounded up (never down, so a stored threshold never shrinks the coverage)."""
    scale = 10**_SCORE_DECIMALS
    return sorted(math.ceil(s * scale - 1e-6) / scale for s in scores.tolist())


def conformal_summary(held: HeldOut, rule: ConformalRule, task: TaskSpec) -> dict[str, float]:
    """Empirical coverage and mean size of the intervals and bin sets on ``held``."""
    low, high = rule.intervals(held.values, task.low, task.high)
    set_low, set_high = rule.bin_sets(held.bin_logits)
    return {"coverage": rule.coverage, "interval_quantile": rule.interval_quantile,
            "set_threshold": rule.set_threshold,
            "interval_coverage": ((low <= held.targets) & (held.targets <= high)).double().mean().item(),
            "mean_interval_width": (high - low).mean().item(),
            "set_coverage": ((set_low <= held.bins) & (held.bins <= set_high)).double().mean().item(),
            "mean_set_size": (set_high - set_low + 1).double().mean().item()}
