"""The bench report: figures judged against the targets that apply to the benched model, the ``--json`` document,
and markdown tables (the README's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from numclip_cli.bench.seeds import aggregate, mae_table, shots_table
from numclip_cli.bench.system import environment

SCHEMA = "numclip-bench/3"  # 2: targets only where they apply, and smoke runs marked; 3: seeds, few-shot, summary
SMOKE_NOTE = "smoke run: too small to judge targets or rank methods"
# The targets the project set for predict's speed, with the model each was set for: a ratio measured on another
# backbone (numclip-tiny's forward pass is ~5 ms, so fixed per-batch work dominates) says nothing about them.
TARGET_MODEL = "ViT-B-16"
ANY_MODEL = "any"
TRAINED = "trained weights"  # --fast agreement on random features measures near-ties, not the quantiser
TARGETS: dict[str, tuple[str, str]] = {
    "ratio_predict_raw": (">= 0.9", TARGET_MODEL),
    "ratio_fast_raw": (">= 1.8", TARGET_MODEL),
    "ratio_train_step_raw": ("<= 1.15", TARGET_MODEL),
    "ratio_reference_k": (">= 1.7", TARGET_MODEL),
    "ratio_reference_m": (">= 15", TARGET_MODEL),
    "fast_agreement": (">= 99", TRAINED),
    "stream_rss_growth": ("< 100", ANY_MODEL),
    "help": ("< 0.5", ANY_MODEL),
}
# units of the accuracy rows (metrics.py: accuracies are fractions)
ACCURACY_UNITS = {"mae": "task unit", "mae_max": "task unit", "accuracy": "fraction", "one_off": "fraction",
                  "qwk": "kappa", "seconds": "s"}
ACCURACY_COLUMNS = ("mae", "mae_max", "accuracy", "one_off", "qwk", "seconds")


@dataclass
class Figure:
    """One measured number with its unit, how it was measured, and the target that applies to it, if any."""

    key: str
    label: str
    value: float
    unit: str
    batch_size: int | None = None
    images: int | None = None
    target: str | None = None  # e.g. ">= 0.9"; None when no target applies to this model
    met: bool | None = None  # whether ``value`` meets ``target``; None without a target or in a smoke run


@dataclass
class SpeedResult:
    """What the speed suite measured: the model it ran and every figure."""

    model: dict[str, Any]  # backbone, weights, trained (checkpoint or weights), input size, method, task, bins
    figures: list[Figure]


def applicable_target(key: str, model: dict[str, Any]) -> str | None:
    """The target of figure ``key`` if it was set for this model (its backbone; trained or random weights)."""
    target, scope = TARGETS.get(key, (None, ANY_MODEL))
    if scope == TARGET_MODEL and model["backbone"] != TARGET_MODEL:
        return None
    if scope == TRAINED and not model["trained"]:
        return None
    return target


def meets(value: float, target: str) -> bool:
    """Whether ``value`` meets a target written as ``">= X"``, ``"<= X"`` or ``"< X"``.

    >>> meets(0.93, ">= 0.9"), meets(0.6, "< 0.5"), meets(1.15, "<= 1.15")
    (True, False, True)
    """
    op, threshold = target.split()
    compare = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__}[op]
    return compare(float(value), float(threshold))


def judge(speed: SpeedResult, smoke: bool) -> list[Figure]:
    """The figures with the targets that apply to the benched model; a smoke run gets no verdicts."""
    judged = []
    for figure in speed.figures:
        target = applicable_target(figure.key, speed.model)
        met = None if target is None or smoke else meets(figure.value, target)
        judged.append(Figure(**{**asdict(figure), "target": target, "met": met}))
    return judged


def build_report(device: torch.device, config: dict[str, Any], speed: SpeedResult | None = None,
                 accuracy: list[dict[str, Any]] | None = None, smoke: bool = False) -> dict[str, Any]:
    """The ``--json`` report: schema, date, environment, options, every figure with its unit, accuracy rows."""
    figures = [asdict(f) for f in judge(speed, smoke)] if speed else []
    return {"schema": SCHEMA, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": environment(device), "config": config, "smoke_run": SMOKE_NOTE if smoke else None,
            "model": speed.model if speed else None, "figures": figures,
            "targets_note": targets_note(speed.model) if speed else None,
            "accuracy": accuracy, "accuracy_units": ACCURACY_UNITS if accuracy else None,
            "accuracy_summary": aggregate(accuracy) if accuracy else None}


def targets_note(model: dict[str, Any]) -> str | None:
    """Which targets are left out for this model, and why (None when every target applies)."""
    reasons = []
    if model["backbone"] != TARGET_MODEL:
        reasons.append(f"the speed-ratio targets are set for {TARGET_MODEL}, not {model['backbone']}")
    if not model["trained"]:
        reasons.append("the --fast agreement target is for trained weights, not random init")
    return "; ".join(reasons) or None


def _number(value: Any, digits: str = ".3f") -> str:
    return "–" if value is None else format(value, digits) if isinstance(value, float) else str(value)


def accuracy_markdown(rows: list[dict[str, Any]]) -> str:
    """Accuracy rows as a GitHub markdown table (numbers to 3 decimals, seconds to 1, missing values as –)."""
    lines = ["| kind | method | seed | shots | " + " | ".join(ACCURACY_COLUMNS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(ACCURACY_COLUMNS)]
    for row in rows:
        cells = [_number(row.get(c), ".1f" if c == "seconds" else ".3f") for c in ACCURACY_COLUMNS]
        lines.append(f"| {row['kind']} | {row['method']} | {_number(row.get('seed'))} | {_number(row.get('shots'))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures_markdown(figures: list[dict[str, Any]]) -> str:
    """Speed figures as a GitHub markdown table, with the applicable target and its verdict."""
    lines = ["| figure | value | unit | batch | images | target |", "|---|---:|---|---:|---:|---|"]
    for fig in figures:
        lines.append(f"| {fig['label']} | {fig['value']:.4g} | {fig['unit']} | {_number(fig['batch_size'])} | "
                     f"{_number(fig['images'])} | {target_cell(fig)} |")
    return "\n".join(lines)


def target_cell(figure: dict[str, Any]) -> str:
    """``">= 0.9 ✓"``, ``">= 0.9 ✗"``, the bare target in a smoke run, or empty when none applies."""
    if figure["target"] is None:
        return ""
    return figure["target"] + ("" if figure["met"] is None else " ✓" if figure["met"] else " ✗")


def markdown(report: dict[str, Any]) -> str:
    """The report's tables as markdown, each under a one-line caption (with the smoke-run label if it is one)."""
    smoke = f" ({report['smoke_run']})" if report["smoke_run"] else ""
    parts = []
    if report["figures"]:
        model = report["model"]
        note = f"; {report['targets_note']}" if report["targets_note"] else ""
        parts.append(f"Speed: {model['backbone']} ({model['pretrained']}, {model['method']}){smoke}{note}\n\n"
                     + figures_markdown(report["figures"]))
    if report["accuracy"]:
        summary = report["accuracy_summary"]
        seeds = max(row["seeds"] for row in summary)
        parts.append(f"Test MAE on the synthetic suites, mean ± std over {seeds} seed(s){smoke}\n\n"
                     + mae_table(summary))
        if any(row["shots"] for row in summary):
            parts.append(f"Few-shot test MAE (K images per rank), mean ± std over {seeds} seed(s){smoke}\n\n"
                         + shots_table(summary))
        parts.append("Every run\n\n" + accuracy_markdown(report["accuracy"]))
    return "\n\n".join(parts)
