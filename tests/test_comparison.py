"""The method comparison: rows, the median baseline, the markdown table (a tiny run; the real one is a benchmark)."""

from __future__ import annotations

import math

import pytest

from numclip_cli.comparison import COLUMNS, main, markdown_table, run_accuracy_suite
from numclip_cli.errors import UsageError


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    seen: list[dict] = []
    result = run_accuracy_suite(["fill"], ["zeroshot", "linear-probe"], n_train=40, n_test=12, epochs=1, seeds=[0],
                                device="cpu", on_progress=seen.append)
    assert seen == result
    return result


def test_rows_hold_every_metric_and_the_median_baseline(rows: list[dict]) -> None:
    assert [(r["kind"], r["method"]) for r in rows] == [("fill", "median"), ("fill", "zeroshot"),
                                                        ("fill", "linear-probe")]
    for row in rows:
        assert set(row) == {"kind", "method", "seed", "shots", *COLUMNS}
        for name in ("mae", "accuracy", "one_off", "qwk", "seconds"):
            assert math.isfinite(row[name]), (row["method"], name)
        assert 0 <= row["accuracy"] <= row["one_off"] <= 1
    median, zeroshot, probe = rows
    assert median["qwk"] == 0.0 and median["mae_max"] is None and zeroshot["mae_max"] is None
    assert math.isfinite(probe["mae_max"])


def test_markdown_table_has_a_row_per_result(rows: list[dict]) -> None:
    table = markdown_table(rows).splitlines()
    assert table[0] == "| kind | method | mae | mae_max | accuracy | one_off | qwk | seconds |"
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| fill | median | ") and "| – |" in table[2]


def test_unknown_method_or_kind_fails_before_any_work() -> None:
    with pytest.raises(UsageError, match="bogus"):
        run_accuracy_suite(["dots"], ["bogus"], 10, 10, 1, [0], "cpu")
    with pytest.raises(UsageError, match="squares"):
        main(["--kinds", "squares", "--methods", "zeroshot"])
