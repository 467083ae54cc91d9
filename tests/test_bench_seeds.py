"""The accuracy suite over several seeds and its few-shot curve (a tiny smoke run; the real one is a benchmark)."""

from __future__ import annotations

import math

import pytest
import torch

from numclip_cli.bench import seeds as seed_stats
from numclip_cli.bench.accuracy import AccuracyConfig, run_accuracy_suite
from numclip_cli.errors import UsageError


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    config = AccuracyConfig.create(kinds=["dots"], methods=["zeroshot", "linear-probe"], n_train=30, n_test=10,
                                   epochs=1, seeds=[0, 1], shots=[1])
    return run_accuracy_suite(config, torch.device("cpu"))


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


@pytest.mark.parametrize(("option", "value"), [("shots", [0]), ("seeds", [])])
def test_bad_seeds_or_shots_fail_before_any_work(option: str, value: list[int]) -> None:
    with pytest.raises(UsageError, match=f"--{option}"):
        AccuracyConfig.create(kinds=["dots"], methods=["zeroshot"], **{option: value})


def test_cli_takes_seeds_and_shots_as_lists(run_cli) -> None:
    result = run_cli(["bench", "--suite", "accuracy", "--shots", "1,x", "--device", "cpu"])
    assert result.exit_code == 2 and "--shots '1,x'" in result.stderr


def test_shots_only_runs_the_few_shot_points_alone() -> None:
    """--shots-only: the median and the K-shot runs, none on the whole training set (those come from another run)."""
    config = AccuracyConfig.create(kinds=["dots"], methods=["linear-probe"], n_train=30, n_test=10, epochs=1,
                                   seeds=[0], shots=[1], shots_only=True)
    rows = run_accuracy_suite(config, torch.device("cpu"))
    assert [(r["method"], r["shots"]) for r in rows] == [("median", None), ("linear-probe", 1)]
    with pytest.raises(UsageError, match="--shots-only needs --shots"):
        AccuracyConfig.create(kinds=["dots"], shots_only=True)
