"""The README's method table is what the recorded runs in ``docs/results`` give: no number in it is typed by hand."""

import json
from pathlib import Path

from numclip_cli.bench.seeds import aggregate, mae_table

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| method | dots | photo | fill | size |\n|---|---:|---:|---:|---:|\n| median"


def test_readme_method_table_is_the_recorded_runs() -> None:
    runs = json.loads((ROOT / "docs" / "results" / "accuracy-10seeds.json").read_text(encoding="utf-8"))["runs"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(HEADER)
    table = readme[start:readme.index("\n\n", start)]
    kinds = [cell.strip() for cell in HEADER.splitlines()[0].strip("|").split("|")[1:]]
    runs.sort(key=lambda run: kinds.index(run["kind"]))  # stable: methods keep their recorded order
    assert table == mae_table(aggregate(runs))
    assert sorted({run["seed"] for run in runs}) == list(range(10))  # the README says 10 seeds
    assert all(sum(1 for run in runs if (run["kind"], run["method"]) == (kind, method)) == 10
               for kind in kinds for method in {run["method"] for run in runs})
