"""Mean ± spread over seeds, and the few-shot curve, from the accuracy suite's per-run rows (``bench.accuracy``).

One training run of a method on a random-init backbone is noisy (test MAE moved by ±0.2 between seeds of the
same recipe), so the accuracy suite runs each (kind, method[, shots]) with several seeds and this module folds
the rows: the mean and the sample standard deviation of every metric, and markdown tables of them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Row = dict[str, Any]
GROUP = ("kind", "method", "shots")  # a row's experiment; rows that differ only in ``seed`` are its repeats
METRICS = ("mae", "mae_max", "accuracy", "one_off", "qwk", "seconds")


def _spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: Iterable[Row], metrics: Sequence[str] = METRICS) -> list[Row]:
    """One row per (kind, method, shots), in first-seen order: ``seeds`` (how many), and ``<metric>`` (mean) and
    ``<metric>_std`` (sample standard deviation) for every metric that all its rows report (else None).

    >>> rows = [{"kind": "dots", "method": "coop", "seed": s, "mae": m} for s, m in ((0, 1.0), (1, 1.2), (2, 0.8))]
    >>> out = aggregate(rows, ["mae"])[0]
    >>> out["seeds"], round(out["mae"], 3), round(out["mae_std"], 3)
    (3, 1.0, 0.2)
    """
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) for key in GROUP), []).append(row)
    folded = []
    for key, members in groups.items():
        out: Row = dict(zip(GROUP, key, strict=True))
        out["seeds"] = len(members)
        for name in metrics:
            values = [m.get(name) for m in members]
            finite = [float(v) for v in values if v is not None and math.isfinite(v)]
            complete = len(finite) == len(values)
            out[name] = statistics.fmean(finite) if complete else None
            out[f"{name}_std"] = _spread(finite) if complete else None
        folded.append(out)
    return folded


def _pm(row: Row, name: str, digits: int = 2) -> str:
    if row.get(name) is None:
        return "–"
    return f"{row[name]:.{digits}f} ± {row[f'{name}_std']:.{digits}f}"


def mae_table(folded: Sequence[Row]) -> str:
    """Markdown: methods as rows, kinds as columns, test MAE mean ± std; the best trained mean per kind in bold.

    >>> print(mae_table([{"kind": "dots", "method": "a", "shots": None, "mae": 1.0, "mae_std": 0.1},
    ...                  {"kind": "dots", "method": "b", "shots": None, "mae": 0.5, "mae_std": 0.0}]))
    | method | dots |
    |---|---:|
    | a | 1.00 ± 0.10 |
    | b | **0.50 ± 0.00** |
    """
    full = [row for row in folded if not row.get("shots")]
    kinds = list(dict.fromkeys(row["kind"] for row in full))
    methods = list(dict.fromkeys(row["method"] for row in full))
    cell = {(row["kind"], row["method"]): row for row in full}
    best = {}
    for kind in kinds:
        means = [cell[kind, m]["mae"] for m in methods if (kind, m) in cell and cell[kind, m]["mae"] is not None
                 and m not in ("median", "zeroshot")]
        best[kind] = min(means) if means else None
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for method in methods:
        cells = []
        for kind in kinds:
            row = cell.get((kind, method))
            text = _pm(row, "mae") if row else "–"
            bold = row is not None and row["mae"] is not None and row["mae"] == best[kind] \
                and method not in ("median", "zeroshot")
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shots_table(folded: Sequence[Row]) -> str:
    """Markdown few-shot curve: one table row per (kind, method), test MAE mean ± std per K (images per rank).

    >>> print(shots_table([{"kind": "dots", "method": "a", "shots": 1, "mae": 2.0, "mae_std": 0.5},
    ...                    {"kind": "dots", "method": "a", "shots": 4, "mae": 1.5, "mae_std": 0.2}]))
    | kind | method | K=1 | K=4 |
    |---|---|---:|---:|
    | dots | a | 2.00 ± 0.50 | 1.50 ± 0.20 |
    """
    few = [row for row in folded if row.get("shots")]
    shots = sorted({row["shots"] for row in few})
    cell = {(row["kind"], row["method"], row["shots"]): row for row in few}
    pairs = list(dict.fromkeys((row["kind"], row["method"]) for row in few))
    lines = ["| kind | method | " + " | ".join(f"K={k}" for k in shots) + " |", "|---|---|" + "---:|" * len(shots)]
    for kind, method in pairs:
        cells = [_pm(cell[kind, method, k], "mae") if (kind, method, k) in cell else "–" for k in shots]
        lines.append(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
