"""The multi-seed and few-shot path of the accuracy suite (a tiny smoke run; the real one is a benchmark)."""

from __future__ import annotations

import math

import pytest

from numclip_cli import seed_stats
from numclip_cli.comparison import run_accuracy_suite
from numclip_cli.errors import UsageError


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return run_accuracy_suite(["dots"], ["zeroshot", "linear-probe"], n_train=30, n_test=10, epochs=1,
                              seeds=[0, 1], device="cpu", shots=[1])


def test_every_seed_and_shot_count_gets_its_own_run(rows: list[dict]) -> None:
    runs = {(r["method"], r["seed"], r["shots"]) for r in rows}
    expected = {("median", s, None) for s in (0, 1)}
    expected |= {(m, s, k) for m in ("zeroshot", "linear-probe") for s in (0, 1) for k in (None, 1)}
    assert runs == expected and len(rows) == len(expected)


def test_seeds_change_the_data_and_the_training(rows: list[dict]) -> None:
    probe = {r["seed"]: r["mae"] for r in rows if r["method"] == "linear-probe" and r["shots"] is None}
    assert probe[0] != probe[1]


def test_aggregate_folds_seeds_into_mean_and_spread(rows: list[dict]) -> None:
    folded = seed_stats.aggregate(rows)
    probe = next(r for r in folded if r["method"] == "linear-probe" and r["shots"] is None)
    maes = [r["mae"] for r in rows if r["method"] == "linear-probe" and r["shots"] is None]
    assert probe["seeds"] == 2
    assert math.isclose(probe["mae"], sum(maes) / 2)
    assert math.isclose(probe["mae_std"], abs(maes[0] - maes[1]) / math.sqrt(2))
    median = next(r for r in folded if r["method"] == "median")
    assert median["mae_max"] is None and median["mae_max_std"] is None


def test_tables_show_mean_and_spread_and_the_few_shot_curve(rows: list[dict]) -> None:
    folded = seed_stats.aggregate(rows)
    table = seed_stats.mae_table(folded).splitlines()
    assert table[0] == "| method | dots |" and len(table) == 2 + 3 and " ± " in table[3]
    curve = seed_stats.shots_table(folded).splitlines()
    assert curve[0] == "| kind | method | K=1 |"
    assert [line.split(" | ")[1] for line in curve[2:]] == ["zeroshot", "linear-probe"]


def test_few_shot_counts_below_one_fail_before_any_work() -> None:
    with pytest.raises(UsageError, match="--shots"):
        run_accuracy_suite(["dots"], ["zeroshot"], 10, 10, 1, [0], "cpu", shots=[0])
