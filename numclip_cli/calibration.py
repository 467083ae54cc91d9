"""Calibration on held-out data: temperature scaling, split-conformal scores, and an honest check of both.

* **Temperature scaling** (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017): one scalar T
  divides the bin logits, chosen to minimise the NLL on held-out data. It changes probabilities, never the
  argmax bin or the fine value, so accuracy and MAE stay exactly as they were.
* **Split conformal prediction** (``numclip_cli.conformal``): an interval for the fine value and a contiguous
  set of bins that hold the truth with probability at least the coverage, for images drawn like the
  calibration images; ``global`` (one threshold) or ``per-bin`` (one per true bin).
* **The check**: the calibration data is split, seeded and stratified by bin; the temperature and the
  conformal scores are fitted on one part and the coverage they *achieve* (with ECE, NLL and the other
  metrics before and after the temperature) is measured on the other part, which the fit never saw. The
  guarantee is about new images like the calibration ones; the measurement shows it on real images, and
  nothing more: on images of another kind (other photographs, another camera) the coverage can be lower.

The set scores use the *uncalibrated* probabilities (T = 1): a temperature fitted for NLL is not the one that
gives the smallest sets, and conformal coverage holds for any fixed probabilities. The sorted raw scores are
stored in the checkpoint so another coverage can be served later without the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from numclip_cli import metrics
from numclip_cli.conformal import (
    ConformalRule,
    bin_probs,
    bin_quantile,
    check_coverage,
    check_mode,
    conformal_quantile,
    interval_scores,
    min_samples_for,
    set_scores,
)
from numclip_cli.errors import CheckpointError, DataError, UsageError
from numclip_cli.tasks import TaskSpec

MIN_SAMPLES = 20  # below this a 90 % quantile is one of the last two scores: not worth storing
DEFAULT_COVERAGE = 0.9
DEFAULT_HOLDOUT = 0.25  # share of the calibration data kept back to measure the achieved coverage
MIN_CHECK = 20  # fewer held-out images than this measure nothing: fit on all the data instead
FEW_CHECK = 100  # below this the measured coverage is a rough figure (± 0.06 at 0.9): say so
FORMAT_GLOBAL, FORMAT_PER_BIN = 1, 2  # metadata version: the oldest reader that serves the calibration right
TEMPERATURE_BOUNDS = (1e-2, 1e2)
MAX_ECE_BINS = 1000  # calibration error bins stored with the metrics (calibrate uses 15)
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
    nonfinite: int = 0  # images left out because the model gave NaN or infinite outputs for them

    def __len__(self) -> int:
        return len(self.targets)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """Bin probabilities at a temperature."""
        return bin_probs(self.bin_logits, temperature)

    def subset(self, keep: torch.Tensor) -> HeldOut:
        """The samples selected by ``keep`` (a boolean mask or indices); the counts of left-out images stay."""
        return HeldOut(self.bin_logits[keep], self.values[keep], self.targets[keep], self.bins[keep], self.source,
                       self.skipped, None if self.values_max is None else self.values_max[keep], self.nonfinite)


def split_held(held: HeldOut, fraction: float, seed: int = 0) -> tuple[HeldOut, HeldOut]:
    """(fit, check): ``fraction`` of each true bin's samples (rounded) go to ``check``, chosen with ``seed``.

    Stratified so both parts see every bin in the same proportions, which the per-bin coverage needs.

    >>> held = HeldOut(torch.zeros(8, 2), torch.zeros(8), torch.zeros(8), torch.tensor([0] * 4 + [1] * 4))
    >>> [len(part) for part in split_held(held, 0.25)]
    [6, 2]
    """
    generator = torch.Generator().manual_seed(seed)
    check = torch.zeros(len(held), dtype=torch.bool)
    for k in held.bins.unique().tolist():
        members = (held.bins == k).nonzero().squeeze(1)
        chosen = members[torch.randperm(len(members), generator=generator)][:round(len(members) * fraction)]
        check[chosen] = True
    return held.subset(~check), held.subset(check)


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



def calibration_metrics(held: HeldOut, task: TaskSpec, temperature: float, ece_bins: int = 15) -> dict[str, float]:
    """ECE, NLL and Brier at a temperature, with ``metrics.summarize`` (MAE in the task unit and in levels,
    accuracy, rank accuracy, 1-off, QWK, RPS, CS@L); a temperature changes only ``mae_levels`` (Σ p_k·k),
    RPS and the three probability scores."""
    probs = held.probs(temperature)
    return {**metrics.summarize(task, held.values, held.targets, probs, value_max=held.values_max),
            "ece": metrics.ece(probs, held.bins, n_bins=ece_bins),
            "nll": metrics.nll(held.bin_logits.double() / temperature, held.bins),
            "brier": metrics.brier(probs, held.bins)}


@dataclass
class Calibration:
    """A fitted temperature and the conformal scores, as stored in a checkpoint's ``calibration`` metadata."""

    temperature: float
    coverage: float
    interval_scores: list[float]  # sorted |y − ŷ| on the fitting part of the calibration data
    set_scores: list[float]  # sorted set scores (uncalibrated probabilities)
    metrics: dict[str, dict[str, float]]  # "before" / "after" the temperature, on the held-out part if any
    data: str
    ece_bins: int = 15
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    conformal: str = "global"
    by_bin: dict[str, list[list[float]]] | None = None  # per-bin: sorted "interval" and "set" scores per true bin
    extents: list[tuple[float, float]] | None = None  # per-bin: each bin's value range
    holdout: dict[str, Any] = field(default_factory=dict)  # fraction, seed, n_fit, n_check
    achieved: dict[str, Any] | None = None  # conformal_summary on the held-out part (None: nothing held out)
    nonfinite: int = 0

    @property
    def n(self) -> int:
        """Number of samples the conformal scores were fitted on."""
        return len(self.interval_scores)

    def rule(self, coverage: float | None = None) -> ConformalRule:
        """The interval and set thresholds at ``coverage`` (default: the calibrated one), from the stored scores."""
        coverage = self.coverage if coverage is None else coverage
        if self.by_bin is None or self.extents is None:
            return ConformalRule(coverage, (conformal_quantile(self.interval_scores, coverage),),
                                 (conformal_quantile(self.set_scores, coverage),))
        rule = ConformalRule(coverage, tuple(bin_quantile(s, coverage) for s in self.by_bin["interval"]),
                             tuple(bin_quantile(s, coverage) for s in self.by_bin["set"]),
                             tuple((float(a), float(b)) for a, b in self.extents))
        if all(math.isinf(q) for q in rule.interval_quantiles):
            raise UsageError(f"per-bin coverage {coverage:g} needs at least {min_samples_for(coverage)} calibration "
                             f"samples in a bin, no bin has as many: lower --coverage or calibrate on more data")
        return rule

    def to_metadata(self) -> dict[str, Any]:
        """Plain JSON data for the checkpoint."""
        rule = self.rule()
        per_bin = self.by_bin is not None
        data = {"version": FORMAT_PER_BIN if per_bin else FORMAT_GLOBAL, "temperature": self.temperature,
                "coverage": self.coverage, "n": self.n, "quantiles": thresholds(rule),
                "scores": {"interval": self.interval_scores, "set": self.set_scores},
                "set_probabilities": "uncalibrated", "metrics": self.metrics, "ece_bins": self.ece_bins,
                "data": self.data, "skipped": self.skipped, "nonfinite": self.nonfinite, "warnings": self.warnings,
                "conformal": self.conformal, "holdout": self.holdout, "achieved": self.achieved}
        if per_bin:
            data["scores_by_bin"] = self.by_bin
            data["extents"] = [list(extent) for extent in self.extents or ()]
        return data

    @classmethod
    def from_metadata(cls, data: dict[str, Any], source: str = "checkpoint") -> Calibration:
        """Rebuild from checkpoint metadata; damaged metadata is a ``CheckpointError``."""
        try:
            if data["version"] not in (FORMAT_GLOBAL, FORMAT_PER_BIN):
                raise ValueError(f"calibration version {data['version']!r} is not supported")
            _check_fields(data)
            per_bin = data["version"] == FORMAT_PER_BIN
            calibration = cls(temperature=float(data["temperature"]), coverage=float(data["coverage"]),
                              interval_scores=_scores(data["scores"]["interval"]),
                              set_scores=_scores(data["scores"]["set"]), metrics=data["metrics"],
                              data=str(data["data"]), ece_bins=int(data["ece_bins"]),
                              skipped=int(data.get("skipped", 0)), warnings=list(data.get("warnings", [])),
                              conformal="per-bin" if per_bin else "global", holdout=dict(data.get("holdout", {})),
                              achieved=data.get("achieved"), nonfinite=int(data.get("nonfinite", 0)))
            low, high = TEMPERATURE_BOUNDS  # all calibrate ever fits (give or take rounding in the search)
            if not low * (1 - 1e-9) <= calibration.temperature <= high * (1 + 1e-9):
                raise ValueError(f"temperature {calibration.temperature:g} is outside {low:g}-{high:g}, the range "
                                 f"calibrate fits in")
            if len(calibration.set_scores) != calibration.n or calibration.n < MIN_SAMPLES:
                raise ValueError("score lists are missing or of different lengths")
            if per_bin:
                calibration.by_bin, calibration.extents = _per_bin(data, calibration.n)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: damaged calibration metadata ({exc}); run `numclip calibrate` "
                                  f"again") from None
        return calibration


def _check_fields(data: dict[str, Any]) -> None:
    """The stored fields ``float``/``int``/``list`` would take but ``calibrate`` never writes (``ValueError``)."""
    if isinstance(data["temperature"], bool):
        raise ValueError("temperature is true/false, not a number")
    coverage = data["coverage"]
    if isinstance(coverage, bool) or not isinstance(coverage, float | int) or not 0 < coverage < 1:
        raise ValueError(f"coverage {coverage!r:.20} is not a number between 0 and 1")
    if type(data["ece_bins"]) is not int or not 1 <= data["ece_bins"] <= MAX_ECE_BINS:
        raise ValueError(f"ece_bins {data['ece_bins']!r:.20} is not a count from 1 to {MAX_ECE_BINS}")
    fields = {"metrics": dict, "holdout": dict, "warnings": list}
    if not all(isinstance(data.get(key, kind()), kind) for key, kind in fields.items()) or not all(
            isinstance(warning, str) for warning in data.get("warnings", [])):
        raise ValueError("metrics and holdout must be tables, warnings a list of text")


def _scores(raw: Any) -> list[float]:
    """A stored score list: finite numbers ≥ 0 (anything else is damage)."""
    scores = [float(s) for s in raw]
    if not all(math.isfinite(s) and s >= 0 for s in scores):
        raise ValueError("a conformal score is negative or not finite")
    return scores


def _per_bin(data: dict[str, Any], n: int) -> tuple[dict[str, list[list[float]]], list[tuple[float, float]]]:
    """The per-bin score lists and bin extents of version-2 metadata, checked against each other."""
    extents = [(float(a), float(b)) for a, b in data["extents"]]
    if not all(math.isfinite(a) and math.isfinite(b) and a <= b for a, b in extents):
        raise ValueError("bin extents are not ordered finite ranges")
    by_bin = {kind: [_scores(scores) for scores in data["scores_by_bin"][kind]] for kind in ("interval", "set")}
    lengths = [[len(scores) for scores in by_bin[kind]] for kind in ("interval", "set")]
    if lengths[0] != lengths[1] or len(lengths[0]) != len(extents) or sum(lengths[0]) != n:
        raise ValueError("per-bin score lists do not match the bins or the pooled scores")
    return by_bin, extents


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


def check_holdout(fraction: float) -> None:
    """The held-out share is at least 0 (0: no check) and below 1."""
    if not 0 <= fraction < 1:
        raise UsageError(f"--holdout must be at least 0 and below 1 (e.g. 0.25), got {fraction:g}")


def calibrate(held: HeldOut, task: TaskSpec, coverage: float = DEFAULT_COVERAGE, ece_bins: int = 15,
              train_data: str | None = None, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
              conformal: str = "global") -> Calibration:
    """Fit the temperature and the conformal scores on part of ``held`` and measure them on the rest.

    ``holdout`` of each bin's samples (seeded by ``seed``) are kept back for the check; with fewer than
    ``MIN_CHECK`` of them, or fewer than ``MIN_SAMPLES`` left to fit on, everything is fitted and nothing
    measured. Warnings go into the result.
    """
    check_coverage(coverage)
    check_mode(conformal)
    check_holdout(holdout)
    if len(held) < MIN_SAMPLES:
        raise DataError(f"{len(held)} usable calibration image(s) in {held.source or 'the data'}: calibration "
                        f"needs at least {MIN_SAMPLES} (a few hundred for stable quantiles)")
    warnings = _data_warnings(held, task, train_data)
    fit, check = _split(held, holdout, seed, coverage, warnings)
    temperature = fit_temperature(fit.bin_logits, fit.bins)
    if not TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1] / 1.01:
        warnings.append(f"the temperature hit its search bound ({temperature:.3g}): the calibration data may be "
                        f"too easy or too small to calibrate on")
    measured = fit if check is None else check
    interval, sets = interval_scores(fit.values, fit.targets), set_scores(fit.probs(), fit.bins)
    result = Calibration(
        temperature=temperature, coverage=coverage, interval_scores=_stored(interval), set_scores=_stored(sets),
        metrics={"before": calibration_metrics(measured, task, 1.0, ece_bins),
                 "after": calibration_metrics(measured, task, temperature, ece_bins)},
        data=held.source, ece_bins=ece_bins, skipped=held.skipped, warnings=warnings, conformal=conformal,
        holdout={"fraction": holdout, "seed": seed, "n_fit": len(fit), "n_check": 0 if check is None else len(check)},
        nonfinite=held.nonfinite)
    if conformal == "per-bin":
        members = [fit.bins == k for k in range(len(task.bins))]
        result.by_bin = {"interval": [_stored(interval[m]) for m in members],
                         "set": [_stored(sets[m]) for m in members]}
        result.extents = task.extents()
        short = [name for name, m in zip(task.bin_names, members, strict=True)
                 if 0 < int(m.sum()) < min_samples_for(coverage)]
        if short:
            warnings.append(f"per-bin: bin(s) {short} have fewer than {min_samples_for(coverage)} calibration "
                            f"images for coverage {coverage:g}: their whole range is always in the interval and "
                            f"the bin always in the set")
    rule = result.rule()  # a coverage the data cannot support fails here, before anything is written
    if check is not None:
        result.achieved = conformal_summary(check, rule, task)
    return result


def _data_warnings(held: HeldOut, task: TaskSpec, train_data: str | None) -> list[str]:
    """What is wrong with the calibration data but does not stop the calibration."""
    warnings = []
    if held.skipped:
        warnings.append(f"{held.skipped} unreadable image(s) in {held.source} were left out")
    if held.nonfinite:
        warnings.append(f"the model gave non-finite outputs (NaN/inf) for {held.nonfinite} image(s) in "
                        f"{held.source}: they were left out")
    counts = torch.bincount(held.bins, minlength=len(task.bins)).tolist()
    missing = [name for name, count in zip(task.bin_names, counts, strict=True) if count == 0]
    if missing:
        warnings.append(f"no calibration sample in bin(s) {missing}: coverage for images of those bins is not "
                        f"checked; calibrate on data that covers every bin")
    if train_data and Path(train_data).resolve() == Path(held.source).resolve():
        warnings.append(f"{held.source} is the checkpoint's training data: calibration needs held-out images "
                        f"or its probabilities and intervals will be over-confident")
    return warnings


def _split(held: HeldOut, holdout: float, seed: int, coverage: float,
           warnings: list[str]) -> tuple[HeldOut, HeldOut | None]:
    """(fit, check) parts of the calibration data, or (all, None) when there is too little to check on."""
    if holdout == 0:
        return held, None
    fit, check = split_held(held, holdout, seed)
    if len(check) < MIN_CHECK or len(fit) < MIN_SAMPLES:
        warnings.append(f"{len(held)} calibration images are too few to hold out {holdout:.0%} for a coverage "
                        f"check (at least {MIN_CHECK} to check and {MIN_SAMPLES} to fit on): fitted on all of them, "
                        f"the achieved coverage is not measured")
        return held, None
    if len(check) < FEW_CHECK:
        spread = 2 * math.sqrt(coverage * (1 - coverage) / len(check))
        warnings.append(f"the achieved coverage is measured on only {len(check)} held-out images (± {spread:.2f} "
                        f"by chance alone): calibrate on more data for a sharper check")
    return fit, check


def _stored(scores: torch.Tensor) -> list[float]:
    """Sorted scores rounded up (never down, so a stored threshold never shrinks the coverage)."""
    scale = 10**_SCORE_DECIMALS
    return sorted(math.ceil(s * scale - 1e-6) / scale for s in scores.tolist())


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity or NaN: an infinite threshold ("always") or an empty bin's rate becomes null."""
    return value if math.isfinite(value) else None


def thresholds(rule: ConformalRule) -> dict[str, Any]:
    """The rule's interval half-width(s) and set threshold(s): numbers (global) or lists with null for "always"."""
    if rule.extents is None:
        return {"interval": rule.interval_quantiles[0], "set": rule.set_thresholds[0]}
    return {"interval": [_finite_or_none(q) for q in rule.interval_quantiles],
            "set": [_finite_or_none(t) for t in rule.set_thresholds]}


def conformal_summary(held: HeldOut, rule: ConformalRule, task: TaskSpec) -> dict[str, Any]:
    """Empirical coverage and mean size of the intervals and bin sets on ``held``, overall and per true bin.

    ``standard_error`` is the chance spread √(c(1−c)/n) of a coverage c measured on n images.
    """
    low, high = rule.intervals(held.values, task.low, task.high)
    set_low, set_high = rule.bin_sets(held.bin_logits)
    in_interval = (low <= held.targets) & (held.targets <= high)
    in_set = (set_low <= held.bins) & (held.bins <= set_high)
    width, size = (high - low).double(), (set_high - set_low + 1).double()

    def rates(mask: torch.Tensor) -> dict[str, float | None]:
        return {"interval_coverage": _finite_or_none(in_interval[mask].double().mean().item()),
                "mean_interval_width": _finite_or_none(width[mask].mean().item()),
                "set_coverage": _finite_or_none(in_set[mask].double().mean().item()),
                "mean_set_size": _finite_or_none(size[mask].mean().item())}

    per_bin = [{"bin": name, "n": int((held.bins == k).sum()), **rates(held.bins == k)}
               for k, name in enumerate(task.bin_names)]
    return {"mode": rule.mode, "coverage": rule.coverage, "n": len(held),
            "standard_error": math.sqrt(rule.coverage * (1 - rule.coverage) / len(held)),
            **rates(torch.ones(len(held), dtype=torch.bool)), "per_bin": per_bin}
