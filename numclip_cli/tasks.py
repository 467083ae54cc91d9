"""Task specs: what is predicted, in which unit, and the ordered concept bins (NumCLIP §3.1).

A task is data, not code: built-ins live in ``task_specs/*.toml`` and users pass their own ``.toml`` or
``.json`` file with the same fields. Bins are ordered, contiguous and non-overlapping.

What a bin means, in one place (labels, the fine head's anchors, readouts and records all use it):

* A bin **stands for** its *representative value*, the midpoint of its inclusive edges ``(low + high) / 2``:
  "1930s" is 1934.5, "young adult" (19–34) is 26.5, the dots bin "one or two" is 1.5. For integer edges this
  is the mean of the integers the bin holds, and the point that is never more than half the bin away from any
  of them.
* A value **belongs to** the bin whose *extent* holds it. Neighbouring extents meet halfway between one bin's
  ``high`` and the next bin's ``low`` (12.5 between child 0–12 and teenager 13–18), so a real value goes to the
  bin of its nearest edge-aligned value and every integer stays in the bin that lists it; a value exactly on
  a boundary belongs to the upper bin. The first extent starts at the task's ``low``, the last ends at its
  ``high``; nothing outside ``[low, high]`` belongs to any bin.
"""

from __future__ import annotations

import bisect
import json
import math
import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from numclip_cli.errors import TaskSpecError
from numclip_cli.faces import ONE_VIEW_MODES
from numclip_cli.names import task_names
from numclip_cli.textfiles import MAX_TASK_SPEC_BYTES, read_text_file

RANK_MODES = ("integers", "bins")
SELECT_METRICS = ("mae", "mae_levels")  # checkpoint selection: lower is better for both
_MAX_INTEGER_RANKS = 1000
_MAX_BINS = 1000  # each bin is a prompt through the text tower (and a column of every loss): bound the work
_MAX_CS_AT = 8
# Bin edges and tolerances: far beyond any real quantity in any unit, and small enough that sums and midpoints of
# task values (representatives, boundaries, intervals) stay finite.
MAX_VALUE = 1e12
SPEC_SUFFIXES = (".toml", ".json")  # a --task value ending so names a spec file, anything else a built-in task


@dataclass(frozen=True)
class Bin:
    """One concept bin: the words the prompt uses and its inclusive edges in the task unit."""

    name: str
    low: float
    high: float

    @property
    def representative(self) -> float:
        """The value the bin stands for: the midpoint of its inclusive edges (see the module docstring)."""
        return (self.low + self.high) / 2


@dataclass(frozen=True)
class TaskSpec:
    """An ordinal task: name, unit, prompt template with ``{}`` for the bin words, and ordered bins."""

    name: str
    unit: str
    prompt: str
    bins: tuple[Bin, ...]
    ranks: str = "integers"  # fine classes for rank-based methods: every integer in range, or the bins
    faces: str = "none"  # default --faces: "largest" crops the largest face first (numclip[face])
    tune_context: bool = False  # numclip trains the shared prompt context by default (NumCLIP does for aesthetics)
    select: str = "mae"  # validation metric that picks the best checkpoint: "mae" (task unit) or "mae_levels"
    cs_at: tuple[float, ...] = (1.0,)  # tolerances L (task unit) of the reported cumulative scores CS@L

    @property
    def bin_names(self) -> list[str]:
        """The bins' words, in order."""
        return [b.name for b in self.bins]

    @property
    def context(self) -> str:
        """The part of the prompt before the bin words; it initialises the learnable context."""
        return self.prompt.split("{}")[0].strip()

    @property
    def low(self) -> float:
        """Smallest value the task covers."""
        return self.bins[0].low

    @property
    def high(self) -> float:
        """Largest value the task covers."""
        return self.bins[-1].high

    def representatives(self) -> list[float]:
        """The value each bin stands for, in order."""
        return [b.representative for b in self.bins]

    def boundaries(self) -> list[float]:
        """Where neighbouring extents meet: halfway between a bin's ``high`` and the next bin's ``low``."""
        return [(prev.high + cur.low) / 2 for prev, cur in zip(self.bins, self.bins[1:], strict=False)]

    def extents(self) -> list[tuple[float, float]]:
        """Each bin's extent ``[start, end)`` (the last one closed): every value in it belongs to the bin."""
        edges = [self.low, *self.boundaries(), self.high]
        return list(zip(edges, edges[1:], strict=False))

    def clamp(self, value: float) -> float:
        """``value`` moved into the task range ``[low, high]``."""
        return min(max(value, self.low), self.high)

    def rank_values(self) -> list[float]:
        """The fine classes of rank-based methods, in the task unit."""
        if self.ranks == "bins":
            return self.representatives()
        return [float(v) for v in range(math.ceil(self.low), math.floor(self.high) + 1)]

    def rank_index(self, value: float) -> int:
        """Index of the rank a value counts as: its bin for ``ranks = "bins"``, else the nearest integer rank."""
        if self.ranks == "bins":
            return self.bin_index(value)
        ranks = self.rank_values()
        return min(range(len(ranks)), key=lambda i: abs(ranks[i] - value))

    def rank_names(self) -> list[str]:
        """The words a rank prompt uses: bin names, or the integer itself."""
        if self.ranks == "bins":
            return self.bin_names
        return [str(int(v)) for v in self.rank_values()]

    def bin_index(self, value: float) -> int:
        """Index of the bin whose extent holds ``value``; raises ``ValueError`` outside the task range."""
        if not (self.low <= value <= self.high) or math.isnan(value):
            raise ValueError(f"{value:g} is outside the task range {self.low:g}–{self.high:g}")
        return bisect.bisect_right(self.boundaries(), value)

    def parse_label(self, text: str) -> float:
        """A label as written in a dataset: a number ("34", "3.0") or a bin name ("1950s")."""
        text = text.strip()
        for b in self.bins:
            if text == b.name:
                return b.representative
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"label {text!r} is neither a number nor one of {self.bin_names}") from None
        self.bin_index(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoint metadata and JSON output."""
        return asdict(self)


def task_from_dict(data: Any, source: str = "task spec") -> TaskSpec:
    """Build and validate a TaskSpec; every problem names the offending field."""
    if not isinstance(data, dict):
        raise TaskSpecError(f"{source}: expected a table of fields, got {type(data).__name__}")
    unknown = set(data) - {"name", "unit", "prompt", "bins", "ranks", "faces", "tune_context", "select", "cs_at"}
    if unknown:
        raise TaskSpecError(f"{source}: unknown field(s) {sorted(map(str, unknown))}")
    name = _text(data, "name", source)
    unit = _text(data, "unit", source, default="")
    prompt = _text(data, "prompt", source)
    if prompt.count("{}") != 1:
        raise TaskSpecError(f"{source}: field 'prompt' must contain '{{}}' exactly once (where bin words go)")
    ranks = _text(data, "ranks", source, default="integers")
    if ranks not in RANK_MODES:
        raise TaskSpecError(f"{source}: field 'ranks' must be one of {list(RANK_MODES)}, got {ranks!r}")
    faces = _text(data, "faces", source, default="none")
    if faces not in ONE_VIEW_MODES:  # 'all' changes how many records an input gives: an explicit choice only
        raise TaskSpecError(f"{source}: field 'faces' must be one of {list(ONE_VIEW_MODES)}, got {faces!r}")
    tune_context = data.get("tune_context", False)
    if not isinstance(tune_context, bool):
        raise TaskSpecError(f"{source}: field 'tune_context' must be true or false, got {tune_context!r}")
    select = _text(data, "select", source, default="mae")
    if select not in SELECT_METRICS:
        raise TaskSpecError(f"{source}: field 'select' must be one of {list(SELECT_METRICS)}, got {select!r}")
    cs_at = _tolerances(data.get("cs_at", [1.0]), source)
    raw_bins = data.get("bins")
    if not isinstance(raw_bins, list) or not 2 <= len(raw_bins) <= _MAX_BINS:
        raise TaskSpecError(f"{source}: field 'bins' must be a list of 2 to {_MAX_BINS} bins")
    bins = tuple(_bin(raw, f"{source}: bins[{i}]") for i, raw in enumerate(raw_bins))
    _check_order(bins, source)
    task = TaskSpec(name=name, unit=unit, prompt=prompt, bins=bins, ranks=ranks, faces=faces,
                    tune_context=tune_context, select=select, cs_at=cs_at)
    if ranks == "integers" and math.floor(task.high) - math.ceil(task.low) + 1 > _MAX_INTEGER_RANKS:
        raise TaskSpecError(f"{source}: field 'ranks' = 'integers' gives more than {_MAX_INTEGER_RANKS} ranks")
    return task


def _text(data: dict, field: str, source: str, default: str | None = None) -> str:
    if field not in data:
        if default is None:
            raise TaskSpecError(f"{source}: missing field '{field}'")
        return default
    value = data[field]
    if value is None:
        raise TaskSpecError(f"{source}: field '{field}' is null; it must be a " +
                            ("non-empty string" if default is None else f"string, or left out for {default!r}"))
    if not isinstance(value, str) or (not value.strip() and default is None):
        raise TaskSpecError(f"{source}: field '{field}' must be a non-empty string")
    return value


def _number(raw: dict, field: str, where: str) -> float:
    value = raw.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise TaskSpecError(f"{where}: field '{field}' must be a finite number, got {value!r}")
    if abs(value) > MAX_VALUE:  # before float(): a huge integer does not fit in one
        raise TaskSpecError(f"{where}: field '{field}' is out of range: task values must be within "
                            f"±{MAX_VALUE:,.0f}")
    return float(value)


def _tolerances(raw: Any, source: str) -> tuple[float, ...]:
    """The CS@L tolerances: a short list of positive numbers."""
    if not isinstance(raw, list) or len(raw) > _MAX_CS_AT:
        raise TaskSpecError(f"{source}: field 'cs_at' must be a list of at most {_MAX_CS_AT} numbers")
    values = tuple(_number({"cs_at": v}, "cs_at", source) for v in raw)
    if any(v <= 0 for v in values):
        raise TaskSpecError(f"{source}: field 'cs_at' must hold positive numbers, got {list(values)}")
    return values


def _bin(raw: Any, where: str) -> Bin:
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{where}: expected a table with name, low, high")
    unknown = set(raw) - {"name", "low", "high"}
    if unknown:
        raise TaskSpecError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TaskSpecError(f"{where}: field 'name' must be a non-empty string")
    if "{" in name or "}" in name:
        raise TaskSpecError(f"{where}: field 'name' must not contain braces")
    low, high = _number(raw, "low", where), _number(raw, "high", where)
    if high < low:
        raise TaskSpecError(f"{where}: field 'high' ({high:g}) is below 'low' ({low:g})")
    return Bin(name=name.strip(), low=low, high=high)


def _check_order(bins: tuple[Bin, ...], source: str) -> None:
    names = [b.name for b in bins]
    for i, (prev, cur) in enumerate(zip(bins, bins[1:], strict=False), start=1):
        where = f"{source}: bins[{i}]"
        if names.count(cur.name) > 1:
            raise TaskSpecError(f"{where}: field 'name' {cur.name!r} is used by more than one bin")
        if cur.low <= prev.high:
            raise TaskSpecError(f"{where}: field 'low' ({cur.low:g}) overlaps or is out of order "
                                f"with the previous bin (high {prev.high:g})")
        if cur.low - prev.high > 1:
            raise TaskSpecError(f"{where}: field 'low' ({cur.low:g}) leaves a gap after the previous bin "
                                f"(high {prev.high:g}); bins must be contiguous")


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return task_names()


def get_task(name_or_path: str) -> TaskSpec:
    """A built-in task by name, or a user spec from a ``.toml`` / ``.json`` file."""
    if name_or_path in list_tasks():
        text = (resources.files("numclip_cli") / "task_specs" / f"{name_or_path}.toml").read_text("utf-8")
        return task_from_dict(tomllib.loads(text), source=f"built-in task {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix.lower() not in SPEC_SUFFIXES:
        raise TaskSpecError(f"unknown task {name_or_path!r}: use one of {list_tasks()} or a .toml/.json file")
    text = read_text_file(path, MAX_TASK_SPEC_BYTES, "task spec", TaskSpecError)
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise TaskSpecError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    return task_from_dict(data, source=str(path))
