"""Task specs: the built-ins, bin lookup and label parsing, user TOML/JSON specs, and every way a spec is wrong."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numclip_cli.errors import TaskSpecError, UsageError
from numclip_cli.tasks import Bin, TaskSpec, get_task, list_tasks, task_from_dict

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

BUILT_IN_BINS = {
    "age": [("child", 0, 12), ("teenager", 13, 18), ("young adult", 19, 34), ("middle adult", 35, 64),
            ("older adult", 65, 100)],
    "hci": [(f"{decade}s", decade, decade + 9) for decade in range(1930, 1980, 10)],
    "aesthetics": [(name, grade, grade) for grade, name in enumerate(
        ["unacceptable", "flawed", "ordinary", "professional", "exceptional"], start=1)],
}

VALID: dict[str, Any] = {
    "name": "stars",
    "unit": "stars",
    "prompt": "a review with {} stars.",
    "bins": [
        {"name": "one", "low": 1, "high": 1},
        {"name": "two or three", "low": 2, "high": 3},
        {"name": "four or five", "low": 4, "high": 5},
    ],
}


def spec(**changes: Any) -> dict[str, Any]:
    """A copy of VALID with top-level fields replaced (``None`` deletes the field)."""
    data = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def with_bins(*bins: tuple[Any, Any, Any]) -> dict[str, Any]:
    return spec(bins=[{"name": n, "low": lo, "high": hi} for n, lo, hi in bins])


def test_list_tasks_has_the_built_ins() -> None:
    assert set(list_tasks()) >= {"age", "hci", "aesthetics"}


@pytest.mark.parametrize("name", sorted(BUILT_IN_BINS))
def test_built_in_bins_match_the_product_contract(name: str) -> None:
    task = get_task(name)
    assert task.name == name
    assert [(b.name, b.low, b.high) for b in task.bins] == BUILT_IN_BINS[name]
    assert task.prompt.count("{}") == 1


@pytest.mark.parametrize("name", list_tasks())
def test_every_built_in_task_is_consistent(name: str) -> None:
    """Parametrised over the registry: every built-in loads, round-trips and maps its own edges."""
    task = get_task(name)
    assert isinstance(task, TaskSpec) and len(task.bins) >= 2 and task.unit
    assert task_from_dict(json.loads(json.dumps(task.to_dict()))) == task
    for prev, cur in zip(task.bins, task.bins[1:], strict=False):
        assert prev.high < cur.low <= prev.high + 1
    for i, b in enumerate(task.bins):
        assert task.bin_index(b.low) == i
        assert task.bin_index(b.high) == i
        assert task.bin_index(b.representative) == i
        assert task.parse_label(b.name) == b.representative == (b.low + b.high) / 2
    ranks = task.rank_values()
    assert ranks == sorted(ranks) and task.low <= ranks[0] and ranks[-1] <= task.high
    assert len(task.rank_names()) == len(ranks)
    assert task.context and "{}" not in task.context


@pytest.mark.parametrize(("value", "expected"), [
    (0, "child"),  # the reference code put label 0 into the last bin
    (12, "child"),
    (12.49, "child"),  # real values between integer edges: extents meet halfway, at 12.5
    (12.5, "teenager"),  # a value on a boundary belongs to the upper bin
    (13, "teenager"),
    (18, "teenager"),
    (19, "young adult"),
    (34.4, "young adult"),
    (34.6, "middle adult"),
    (64, "middle adult"),
    (65, "older adult"),
    (100, "older adult"),
])
def test_age_bin_index_edges(value: float, expected: str) -> None:
    task = get_task("age")
    assert task.bins[task.bin_index(value)].name == expected


@pytest.mark.parametrize("value", [-1, -0.001, 100.5, 1e9, math.nan, math.inf, -math.inf])
def test_bin_index_outside_the_range_raises(value: float) -> None:
    with pytest.raises(ValueError, match="outside the task range"):
        get_task("age").bin_index(value)


@pytest.mark.parametrize(("task", "text", "expected"), [
    ("age", "34", 34.0),
    ("age", " 34 ", 34.0),
    ("age", "3.0", 3.0),
    ("age", "0", 0.0),
    ("age", "young adult", 26.5),
    ("hci", "1950s", 1954.5),
    ("hci", "1954", 1954.0),
    ("aesthetics", "3.0", 3.0),
    ("aesthetics", "exceptional", 5.0),
])
def test_parse_label(task: str, text: str, expected: float) -> None:
    assert get_task(task).parse_label(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "101", "-5", "nan", "Child", "1920s"])
def test_parse_label_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        get_task("age" if text != "1920s" else "hci").parse_label(text)


def test_user_spec_from_toml_and_json(tmp_path: Path) -> None:
    toml_file = tmp_path / "stars.toml"
    toml_file.write_text(textwrap.dedent("""\
        name = "stars"
        unit = "stars"
        prompt = "a review with {} stars."
        [[bins]]
        name = "one"
        low = 1
        high = 1
        [[bins]]
        name = "two or three"
        low = 2
        high = 3
        [[bins]]
        name = "four or five"
        low = 4
        high = 5
    """), encoding="utf-8")
    json_file = tmp_path / "stars.JSON"
    json_file.write_text(json.dumps(VALID), encoding="utf-8")
    from_toml, from_json = get_task(str(toml_file)), get_task(str(json_file))
    assert from_toml == from_json == task_from_dict(VALID)
    assert from_toml.bins[1] == Bin("two or three", 2.0, 3.0)
    assert from_toml.bin_names == ["one", "two or three", "four or five"]
    assert from_toml.context == "a review with"
    assert from_toml.rank_values() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_ranks_bins_mode_uses_representatives() -> None:
    task = task_from_dict(spec(ranks="bins"))
    assert task.rank_values() == [1.0, 2.5, 4.5]
    assert task.rank_names() == task.bin_names


@pytest.mark.parametrize("name", list_tasks())
def test_extents_cover_the_range_and_hold_every_listed_value(name: str) -> None:
    """Extents tile [low, high] without gaps; each holds its bin's representative and every value it lists."""
    task = get_task(name)
    extents = task.extents()
    assert extents[0][0] == task.low and extents[-1][1] == task.high
    assert all(prev[1] == cur[0] for prev, cur in zip(extents, extents[1:], strict=False))
    for i, (b, (start, end)) in enumerate(zip(task.bins, extents, strict=True)):
        assert start <= b.low <= b.representative <= b.high <= end
        assert task.bin_index(start) == i and task.bin_index(math.nextafter(end, -math.inf)) == i


@FUZZ
@given(st.floats(0, 100))
def test_bin_index_is_the_bin_of_the_nearest_listed_value(value: float) -> None:
    """For integer edges a real value belongs to the bin that lists its nearest integer (halves round up)."""
    task = get_task("age")
    nearest = math.floor(value + 0.5)
    assert task.bin_index(value) == next(i for i, b in enumerate(task.bins) if b.low <= nearest <= b.high)


def test_clamp_keeps_values_in_the_task_range() -> None:
    task = get_task("aesthetics")
    assert [task.clamp(v) for v in (-3.0, 1.0, 4.2, 5.0, 7.5)] == [1.0, 1.0, 4.2, 5.0, 5.0]


@pytest.mark.parametrize(("name", "tune_context", "select"), [
    ("age", False, "mae"), ("hci", False, "mae_levels"), ("aesthetics", True, "mae_levels")])
def test_built_ins_state_context_training_and_selection_metric(name: str, tune_context: bool, select: str) -> None:
    """As the reference trains: context frozen for age and HCI, trained for aesthetics; selection on the paper's
    metric (years for age, level MAE for the 5-level tasks)."""
    task = get_task(name)
    assert (task.tune_context, task.select) == (tune_context, select)


def test_user_specs_default_to_frozen_context_mae_and_cs_at_1() -> None:
    task = task_from_dict(VALID)
    assert (task.tune_context, task.select, task.cs_at) == (False, "mae", (1.0,))
    custom = task_from_dict(spec(tune_context=True, select="mae_levels", cs_at=[0.5, 2]))
    assert (custom.tune_context, custom.select, custom.cs_at) == (True, "mae_levels", (0.5, 2.0))
    assert task_from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


def test_rank_index_is_the_bin_or_the_nearest_integer() -> None:
    assert [get_task("age").rank_index(v) for v in (0, 3.4, 3.6, 100)] == [0, 3, 4, 100]
    assert [get_task("hci").rank_index(v) for v in (1930, 1944.5, 1979)] == [0, 1, 4]


# (spec, words the message must contain: the offending field, and where it is)
MALFORMED: dict[str, tuple[Any, list[str]]] = {
    "missing name": (spec(name=None), ["'name'"]),
    "blank name": (spec(name="   "), ["'name'"]),
    "missing prompt": (spec(prompt=None), ["'prompt'"]),
    "no {} in prompt": (spec(prompt="a review with stars."), ["'prompt'"]),
    "two {} in prompt": (spec(prompt="{} stars, {} reviews"), ["'prompt'"]),
    "prompt not text": (spec(prompt=3), ["'prompt'"]),
    "bins not a list": (spec(bins={"name": "one", "low": 1, "high": 1}), ["'bins'"]),
    "bins missing": (spec(bins=None), ["'bins'"]),
    "one bin only": (with_bins(("one", 1, 5)), ["'bins'"]),
    "bin not a table": (spec(bins=[{"name": "one", "low": 1, "high": 1}, "two"]), ["bins[1]"]),
    "overlapping bins": (with_bins(("low", 0, 5), ("high", 5, 10)), ["bins[1]", "'low'"]),
    "gap between bins": (with_bins(("low", 0, 4), ("high", 6, 10)), ["bins[1]", "'low'", "gap"]),
    "out-of-order bins": (with_bins(("high", 6, 10), ("low", 0, 5)), ["bins[1]", "'low'"]),
    "high < low": (with_bins(("low", 0, 5), ("high", 9, 6)), ["bins[1]", "'high'"]),
    "empty bin name": (with_bins(("", 0, 5), ("high", 6, 10)), ["bins[0]", "'name'"]),
    "bin name not text": (with_bins((7, 0, 5), ("high", 6, 10)), ["bins[0]", "'name'"]),
    "braces in bin name": (with_bins(("{x}", 0, 5), ("high", 6, 10)), ["bins[0]", "'name'"]),
    "non-numeric low": (with_bins(("low", "zero", 5), ("high", 6, 10)), ["bins[0]", "'low'"]),
    "boolean high": (with_bins(("low", 0, True), ("high", 6, 10)), ["bins[0]", "'high'"]),
    "infinite high": (with_bins(("low", 0, 5), ("high", 6, math.inf)), ["bins[1]", "'high'"]),
    "missing low": (spec(bins=[{"name": "a", "high": 1}, {"name": "b", "low": 2, "high": 3}]), ["'low'"]),
    "duplicate names": (with_bins(("same", 0, 5), ("other", 6, 8), ("same", 9, 10)), ["bins[2]", "'name'"]),
    "unknown field": (spec(colour="red"), ["colour"]),
    "bad ranks": (spec(ranks="decimals"), ["'ranks'"]),
    "too many integer ranks": (with_bins(("low", 0, 5000), ("high", 5001, 10000)), ["'ranks'"]),
    "not a table": ([VALID], ["table"]),
    "tune_context not a boolean": (spec(tune_context="yes"), ["'tune_context'"]),
    "unknown select metric": (spec(select="accuracy"), ["'select'"]),
    "cs_at not a list": (spec(cs_at=5), ["'cs_at'"]),
    "cs_at not positive": (spec(cs_at=[1, 0]), ["'cs_at'"]),
    "cs_at not numbers": (spec(cs_at=["five"]), ["'cs_at'"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_spec_names_the_offending_field(case: str) -> None:
    data, words = MALFORMED[case]
    with pytest.raises(TaskSpecError) as info:
        task_from_dict(data, source="my.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("my.toml")
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert isinstance(info.value, UsageError)  # a bad spec is a usage error (exit 2)


def test_unknown_field_inside_a_bin_is_rejected() -> None:
    """A typo in a bin (``hihg``, ``words``) must not be ignored silently: top-level unknown fields are not."""
    data = spec(bins=[{"name": "one", "low": 1, "high": 1, "words": "a single"},
                      {"name": "two", "low": 2, "high": 2}])
    with pytest.raises(TaskSpecError, match="words"):
        task_from_dict(data)


def test_huge_integer_edge_is_a_spec_error() -> None:
    """JSON allows integers beyond float range; ``math.isfinite`` on them raises OverflowError."""
    data = json.loads('{"name": "t", "prompt": "{}", "bins": [{"name": "a", "low": 0, "high": 1},'
                      ' {"name": "b", "low": 2, "high": 1' + "0" * 400 + "}]}")
    with pytest.raises(TaskSpecError, match="'high'"):
        task_from_dict(data)


def test_wide_integer_range_fails_fast_without_memory_blowup() -> None:
    """ranks = "integers" over 0..1e12 must be refused by counting, not by listing 10^12 ranks.

    Runs in a child with a 1 GiB address-space limit and a timeout, so the bug cannot take the test run
    (or the machine) down with it.
    """
    code = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from numclip_cli.tasks import task_from_dict
        from numclip_cli.errors import TaskSpecError
        data = {"name": "t", "prompt": "{}", "bins": [{"name": "a", "low": 0, "high": 10},
                                                        {"name": "b", "low": 11, "high": 10 ** 12}]}
        try:
            task_from_dict(data)
        except TaskSpecError as exc:
            print("TaskSpecError:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "TaskSpecError" in proc.stdout and "'ranks'" in proc.stdout, proc.stderr[-500:]


@pytest.mark.parametrize("count, ok", [(1000, True), (1001, False)])
def test_bin_count_is_bounded(count: int, ok: bool) -> None:
    """Each bin is a prompt through the text tower: a spec (or a checkpoint's copy of one) cannot ask for 10⁶."""
    data = {"name": "t", "prompt": "{}", "ranks": "bins",
            "bins": [{"name": f"b{i}", "low": i, "high": i} for i in range(count)]}
    if ok:
        assert len(task_from_dict(data).bins) == count
    else:
        with pytest.raises(TaskSpecError, match="'bins' must be a list of 2 to 1000 bins"):
            task_from_dict(data)


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nprompt = "a {}\n', encoding="utf-8")
    with pytest.raises(TaskSpecError) as info:
        get_task(str(path))
    assert "TOML" in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_invalid_json_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x", ', encoding="utf-8")
    with pytest.raises(TaskSpecError, match="JSON"):
        get_task(str(path))


def test_deeply_nested_json_is_a_spec_error(tmp_path: Path) -> None:
    """json.loads raises RecursionError (not JSONDecodeError) on deep nesting; still a bad spec, not a crash."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000, encoding="utf-8")
    with pytest.raises(TaskSpecError):
        get_task(str(path))


@pytest.mark.parametrize("name", ["nope", "spec.yaml", "missing.toml"])
def test_unknown_task_or_unreadable_file(name: str, tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError):
        get_task(str(tmp_path / name) if "." in name else name)


def test_spec_file_that_is_not_utf8_or_a_directory(tmp_path: Path) -> None:
    binary = tmp_path / "latin.toml"
    binary.write_bytes(b'name = "\xff"\n')
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for path in (binary, folder):
        with pytest.raises(TaskSpecError):
            get_task(str(path))


# --- fuzzing: whatever the data, task_from_dict returns a valid spec or raises TaskSpecError ---------------

# Numbers stay small enough that a valid "integers" spec has few ranks; the huge ones are what JSON can hold
# beyond float range (they must be rejected before anything else looks at them).
numbers = st.one_of(st.integers(-2000, 2000), st.floats(-2000, 2000),
                    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), True, False]))
scalars = st.one_of(st.none(), st.text(max_size=12), numbers, st.sampled_from(["{}", "a {} b", "{} {}", ""]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
fields = st.sampled_from(["name", "unit", "prompt", "bins", "ranks", "low", "high", "extra"])


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """A valid spec with a few random edits: fields replaced, deleted or added, at the top or in a bin."""
    data = copy.deepcopy(VALID)
    if draw(st.booleans()):
        data["ranks"] = draw(st.sampled_from(["integers", "bins"]))
    for _ in range(draw(st.integers(1, 4))):
        target = data
        if draw(st.booleans()) and isinstance(data.get("bins"), list) and data["bins"]:
            index = draw(st.integers(0, len(data["bins"]) - 1))
            target = data["bins"][index]
            if not isinstance(target, dict):
                continue
        key = draw(fields)
        if draw(st.integers(0, 3)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return data


@pytest.mark.slow
@FUZZ
@given(st.one_of(mutated_specs(), json_values))
def test_task_from_dict_only_raises_task_spec_errors(data: Any) -> None:
    try:
        task = task_from_dict(data)
    except TaskSpecError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert task.prompt.count("{}") == 1
    assert len(task.bins) >= 2 and len(set(task.bin_names)) == len(task.bins)
    for prev, cur in zip(task.bins, task.bins[1:], strict=False):
        assert prev.low <= prev.high < cur.low <= prev.high + 1
    assert task.bin_index(task.low) == 0 and task.bin_index(task.high) == len(task.bins) - 1


@pytest.mark.slow
@FUZZ
@given(mutated_specs())
def test_json_text_specs_only_raise_task_spec_errors(data: Any) -> None:
    """The same through JSON text, as a user's .json file arrives (NaN/Infinity and big integers included)."""
    try:
        task_from_dict(json.loads(json.dumps(data)), source="fuzz.json")
    except TaskSpecError as exc:
        assert str(exc).startswith("fuzz.json")


def test_tasks_command_lists_and_validates(run_cli, tmp_path: Path) -> None:
    listed = run_cli(["tasks"])
    assert listed.exit_code == 0, listed.stderr
    for name in ("age", "hci", "aesthetics"):
        assert name in listed.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec(prompt="no braces")), encoding="utf-8")
    refused = run_cli(["tasks", str(bad)])
    assert refused.exit_code == 2
    assert "'prompt'" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
