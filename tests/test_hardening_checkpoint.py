"""Damaged checkpoints and task specs: resume state, deeply nested metadata and out-of-range numbers are each one
clear error naming the file, never an unexpected exception or a model that only predicts NaN."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from helpers import one_error_line
from safetensors import safe_open
from safetensors.torch import save_file

from numclip_cli.calibration import Calibration
from numclip_cli.checkpoint import read_checkpoint
from numclip_cli.errors import CheckpointError, TaskSpecError
from numclip_cli.synthetic import write_dataset
from numclip_cli.tasks import get_task
from numclip_cli.trainer import last_path

TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu"]
FAST = ["--batch-size", "64", "--lr", "3e-3", "--image-lr", "1e-3", "--milestones", "2", "--workers", "0",
        "--seed", "7", "-q"]


def rewrite(source: Path, target: Path, changes: dict[str, Any] | None = None,
            tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t) -> Path:
    """A copy of checkpoint ``source`` at ``target`` with metadata fields replaced (a value that is not a string
    is stored as JSON) and its tensors passed through ``tensors``."""
    with safe_open(str(source), framework="pt") as handle:
        meta = handle.metadata()
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    meta.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in (changes or {}).items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors(stored), str(target), metadata=meta)
    return target


def stored(path: Path, field: str) -> Any:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[field])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fill")
    write_dataset("fill", root, n=24, seed=3)
    return root


@pytest.fixture(scope="module")
def train(run_cli, data: Path) -> Callable[..., Result]:
    """``train(out, epochs, *extra)``: a short seeded ``numclip train`` run on the tiny model."""

    def run(out: Path, epochs: int, *extra: str) -> Result:
        return run_cli(["train", "--data", data, *TINY, *FAST, "--epochs", epochs, "--out", out, *extra])

    return run


@pytest.fixture(scope="module")
def trained(train, tmp_path_factory) -> Path:
    """The best checkpoint of a finished 1-epoch run; its ``last`` file lies beside it."""
    out = tmp_path_factory.mktemp("trained") / "m.safetensors"
    result = train(out, 1)
    assert result.exit_code == 0, result.stderr
    return out


def resume_copy(trained: Path, folder: Path, resume: Callable[[dict], Any] | None = None,
                tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t) -> Path:
    """A copy of the trained run in ``folder`` whose ``last`` file has its resume state passed through ``resume``;
    returns the copy's ``--out``."""
    out = folder / "m.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained, out)
    state = stored(last_path(trained), "resume")
    rewrite(last_path(trained), last_path(out), {"resume": resume(state) if resume else state}, tensors)
    return out


def changed(state: dict, **fields: Any) -> dict:
    return {**state, **fields}


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def renamed_tensor(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new if key == old else key: value for key, value in tensors.items()}


DAMAGED_RESUME = {
    "best_score null": (lambda s: changed(s, best_score=None), None),
    "epoch a string": (lambda s: changed(s, epoch="abc"), None),
    "epoch negative": (lambda s: changed(s, epoch=-5), None),
    "epoch beyond its history": (lambda s: changed(s, epoch=10**9), None),
    "scheduler missing": (lambda s: without(s, "scheduler"), None),
    "scheduler field mistyped": (lambda s: changed(s, scheduler={**s["scheduler"], "_step_count": "x"}), None),
    "history entry bogus": (lambda s: changed(s, history=[{"bogus": 1}]), None),
    "optimizer scalar without a dot": (lambda s: changed(s, optimizer_scalars={"nodot": 1}), None),
    "one param group of several": (lambda s: changed(s, param_groups=s["param_groups"][:1]), None),
    "learning rate a string": (lambda s: changed(s, param_groups=[{**s["param_groups"][0], "lr": "nan"},
                                                                *s["param_groups"][1:]]), None),
    "resume a list": (lambda s: [1, 2], None),
    "optimizer tensor of no parameter": (None, lambda t: renamed_tensor(t, "optim.0.exp_avg", "optim.abc.exp_avg")),
    "optimizer tensor of the wrong shape": (None, lambda t: {**t, "optim.0.exp_avg": torch.zeros(7, 7)}),
    "optimizer state of parameter 999": (None, lambda t: {**t, "optim.999.exp_avg": torch.zeros(3)}),
}


@pytest.mark.parametrize("case", list(DAMAGED_RESUME))
def test_damaged_resume_state_is_one_error_naming_the_file(case: str, train, trained: Path, tmp_path: Path) -> None:
    resume, tensors = DAMAGED_RESUME[case]
    out = resume_copy(trained, tmp_path / "run", resume, tensors or (lambda t: t))
    before = last_path(out).read_bytes()
    result = train(out, 2, "--resume")
    line = one_error_line(result.stderr)
    assert result.exit_code == 1
    assert f"{last_path(out)}: holds damaged resume state (" in line, line
    assert line.endswith("delete it or train without --resume"), line
    assert last_path(out).read_bytes() == before  # refused before any training


@pytest.mark.parametrize("scheduler", [
    lambda fields: {**fields, "step": 1},  # unknown to the scheduler: dropped, never set over its step method
    lambda fields: without(fields, "_get_lr_called_within_step")])  # as from an older torch: keeps its default
def test_scheduler_fields_this_torch_does_not_know_or_lacks_still_resume(scheduler, train, trained: Path,
                                                                        tmp_path: Path) -> None:
    out = resume_copy(trained, tmp_path / "run", lambda s: changed(s, scheduler=scheduler(s["scheduler"])))
    result = train(out, 2, "--resume")
    assert result.exit_code == 0, result.stderr


def test_intact_resume_state_still_resumes(train, trained: Path, tmp_path: Path) -> None:
    out = resume_copy(trained, tmp_path / "run")
    result = train(out, 2, "--resume")
    assert result.exit_code == 0, result.stderr
    assert stored(last_path(out), "resume")["epoch"] == 2


def test_resuming_a_longer_run_asks_for_more_epochs(train, trained: Path, tmp_path: Path) -> None:
    def two_epochs(state: dict) -> dict:
        second = {**state["history"][0], "epoch": 2}
        return changed(state, epoch=2, history=[*state["history"], second],
                       scheduler={**state["scheduler"], "last_epoch": 2})

    out = resume_copy(trained, tmp_path / "run", two_epochs)
    result = train(out, 1, "--resume")
    line = one_error_line(result.stderr)
    assert result.exit_code == 2
    assert "already trained 2 epochs, more than --epochs 1" in line and "--epochs 2 or more" in line, line


def test_a_finished_run_without_its_best_checkpoint_says_it_is_finished(train, trained: Path,
                                                                        tmp_path: Path) -> None:
    out = resume_copy(trained, tmp_path / "run")
    out.unlink()
    result = train(out, 1, "--resume")
    line = one_error_line(result.stderr)
    assert result.exit_code == 1
    assert "already finished its 1 epoch(s)" in line and "larger --epochs" in line, line
    assert "checkpoint not found" not in line


@pytest.mark.parametrize("field", ["backbone", "task", "train", "calibration", "resume"])
def test_deeply_nested_metadata_is_damaged_metadata(field: str, trained: Path, tmp_path: Path) -> None:
    path = rewrite(trained, tmp_path / "deep.safetensors", {field: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: damaged metadata:"), info.value


def calibration_with(temperature: float) -> dict[str, Any]:
    scores = [0.1 * i for i in range(30)]
    return Calibration(temperature=temperature, coverage=0.9, interval_scores=scores, set_scores=scores,
                       metrics={}, data="held-out").to_metadata()


@pytest.mark.parametrize("temperature", [1e-300, 0.009, 100.1, 1e300])
def test_a_temperature_calibrate_never_writes_is_damage(temperature: float) -> None:
    with pytest.raises(CheckpointError) as info:
        Calibration.from_metadata(calibration_with(temperature), "my.safetensors")
    message = str(info.value)
    assert message.startswith("my.safetensors: damaged calibration metadata (temperature") and "0.01-100" in message
    assert "numclip calibrate" in message


@pytest.mark.parametrize("temperature", [0.01, math.exp(math.log(100)), 1.0])
def test_temperatures_calibrate_can_write_load(temperature: float) -> None:
    # the search ends at exp(log(bound)), a rounding step beyond the bound
    assert Calibration.from_metadata(calibration_with(temperature)).temperature == temperature


@pytest.mark.parametrize(("key", "values", "words"), [
    ("std", [1e-300] * 3, "std must be three finite numbers above 0 (from 0.001 to 10)"),
    ("std", [11.0] * 3, "std must be three finite numbers above 0 (from 0.001 to 10)"),
    ("mean", [1e308, 1e308, -1e308], "mean must be three finite numbers (from -10 to 10)"),
])
def test_normalisation_beyond_sane_ranges_is_damaged_metadata(key: str, values: list[float], words: str,
                                                              trained: Path, tmp_path: Path) -> None:
    preprocess = stored(trained, "preprocess")
    preprocess["image"][key] = values
    path = rewrite(trained, tmp_path / "pp.safetensors", {"preprocess": preprocess})
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: damaged metadata:") and words in str(info.value), info.value


def test_huge_bin_edge_in_a_checkpoint_is_damaged_metadata(trained: Path, tmp_path: Path) -> None:
    task = stored(trained, "task")
    task["bins"][-1]["high"] = 1.7e308
    path = rewrite(trained, tmp_path / "task.safetensors", {"task": task})
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: damaged metadata: task: bins[{len(task['bins']) - 1}]: field 'high'"), message
    assert "out of range" in message


def spec_file(tmp_path: Path, **fields: Any) -> str:
    data = {"name": "t", "prompt": "a photo of {}", "bins": [{"name": "low", "low": 0, "high": 4},
                                                              {"name": "high", "low": 5, "high": 9}], **fields}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("value", [1.7e308, -1.1e12, 10**400])
def test_task_values_beyond_a_trillion_are_refused(value: float, tmp_path: Path) -> None:
    bins = [{"name": "low", "low": 0, "high": 4}, {"name": "high", "low": 5, "high": value}]
    with pytest.raises(TaskSpecError, match=r"bins\[1\]: field 'high' is out of range: task values must be within"):
        get_task(spec_file(tmp_path, bins=bins, ranks="bins"))


def test_a_trillion_is_still_a_task_value(tmp_path: Path) -> None:
    bins = [{"name": "low", "low": -1e12, "high": 0}, {"name": "high", "low": 1, "high": 1e12}]
    assert get_task(spec_file(tmp_path, bins=bins, ranks="bins")).high == 1e12


@pytest.mark.parametrize(("field", "words"), [
    ("select", "field 'select' is null; it must be a string, or left out for 'mae'"),
    ("name", "field 'name' is null; it must be a non-empty string"),
])
def test_a_null_field_is_called_null_not_missing(field: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError) as info:
        get_task(spec_file(tmp_path, **{field: None}))
    assert words in str(info.value) and "missing" not in str(info.value), info.value


def test_a_null_field_through_the_cli_is_a_usage_error(run_cli, data: Path, tmp_path: Path) -> None:
    result = run_cli(["train", "--data", data, "--task", spec_file(tmp_path, select=None), *TINY, "--epochs", 1,
                      "--out", tmp_path / "m.safetensors"])
    assert result.exit_code == 2 and "field 'select' is null" in one_error_line(result.stderr)


@pytest.mark.parametrize(("field", "value", "said"), [
    ("coverage", 5.0, "coverage 5.0 is not a number between 0 and 1"), ("coverage", True, "coverage True"),
    ("temperature", True, "temperature is true/false"), ("ece_bins", 1e300, "ece_bins 1e+300 is not a count"),
    ("warnings", "abc", "warnings a list of text"), ("metrics", None, "metrics and holdout must be tables"),
    ("holdout", [1, 2], "metrics and holdout must be tables")])
def test_calibration_fields_calibrate_never_writes_are_damage(field: str, value: Any, said: str) -> None:
    with pytest.raises(CheckpointError, match="damaged calibration metadata") as info:
        Calibration.from_metadata({**calibration_with(1.0), field: value}, "my.safetensors")
    assert said in str(info.value)
