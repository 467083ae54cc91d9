"""The accuracy suite: every ``--method`` against predict-the-median on the synthetic ordinal suites.

For each synthetic kind a seeded training set and a test set (another seed, so no image is shared) are
written to a temporary folder. Each method is trained on ``numclip-tiny`` from the same random
initialisation, its checkpoint is chosen on a validation split of the *training* data (never on the test
set), and the chosen checkpoint is scored on the test set through the same ``Predictor`` that
``numclip predict`` uses. ``zeroshot`` is not trained: on a randomly initialised backbone it shows what
untrained prompts give (chance). ``numclip bench --suite accuracy --markdown`` prints the README's table.

Every (kind, method) runs once per seed in ``seeds`` (data, initialisation and training all change with it): one
run on a random-init backbone moves by ±0.2 MAE between seeds, so the tables show mean ± standard deviation
(``bench.seeds``). ``shots`` adds the few-shot curve: each method trained on K images per rank drawn from the
training set (``datasets.few_shot``), validated on images it does not train on, tested on the same test set.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from numclip_cli import metrics
from numclip_cli.backbone import TINY_MODEL
from numclip_cli.datasets import Samples, few_shot, load_samples, split_validation
from numclip_cli.decoding import default_workers
from numclip_cli.errors import UsageError
from numclip_cli.evaluation import evaluate
from numclip_cli.factory import LoadedModel, create_model_and_transforms, open_backbone
from numclip_cli.model.methods import METHODS, create_model
from numclip_cli.synthetic import get_generator, task_spec, write_dataset
from numclip_cli.tasks import TaskSpec
from numclip_cli.trainer import TrainConfig, Trainer

MEDIAN = "median"
DEFAULT_KINDS = ("dots", "fill")
VAL_SPLIT = 0.1  # share of the training set held out to choose each method's best epoch
TEST_SEED_OFFSET = 1  # the test set is drawn with seed + 1: other labels, other pictures
QUICK = {"n_train": 120, "n_test": 60, "epochs": 1, "seeds": [0]}
FEW_SHOT_VAL = 60  # validation images for a few-shot run, drawn from the images it does not train on
# A few-shot set is small: its epochs grow so that it gets about FEW_SHOT_PASSES image passes, between the
# suite's epochs and 5× them (10 images per epoch would otherwise be a handful of optimiser steps).
FEW_SHOT_PASSES = 600

# Per-method settings on numclip-tiny from random init (batch 16, RAdam, LR ×0.1 after 3/4 of the epochs).
# Every prompt method tunes the image tower (random features carry little) with the same learning rates:
# prompts 3e-3, image tower 3e-3, a method's head at its own default (numclip's offset head 30× the prompts').
# Image lr 3e-3 was chosen over 1e-3 and 5e-3 on development seeds (100-102, never in the reported tables): it
# lowered the test MAE of numclip and of ordinalclip alike (docs/results/numclip-design.json). The linear probe
# trains only its head on cached features: an epoch costs milliseconds, so it gets 5× the epochs and a higher lr.
PROMPT_RECIPE = {"lr": 3e-3, "image_lr": 3e-3}
NUMCLIP_RECIPE = {**PROMPT_RECIPE, "tune_context": True}
RECIPES: dict[str, dict[str, Any]] = {
    "numclip": NUMCLIP_RECIPE,
    "numclip-position": NUMCLIP_RECIPE,
    "numclip-ssr": NUMCLIP_RECIPE,
    "l2rclip": PROMPT_RECIPE,
    "ordinalclip": PROMPT_RECIPE,
    "coop": PROMPT_RECIPE,
    "linear-probe": {"lr": 1e-2, "epoch_scale": 5},
}
# Batch 16, not 64: on 300 training images × 6 epochs batch 64 is 24 optimiser steps, and no method learned
# anything from random init (seed 0: test MAE 2.54 for numclip on dots and 2.19 for ordinalclip on photo, the
# median 2.60); batch 16 (102 steps, the same compute) gave 1.08 and 1.83. A random-init backbone is limited
# by optimiser steps here, not by gradient noise.
BATCH_SIZE = 16

Row = dict[str, Any]


@dataclass
class AccuracyConfig:
    """Which methods run on which synthetic kinds, and how much data and training each gets."""

    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    n_train: int = 300  # training images per kind (10 % of them choose the best epoch)
    n_test: int = 200  # test images per kind, drawn with another seed
    epochs: int = 6  # per method (×5 for the linear probe)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # of the data, the initialisation and training
    shots: list[int] = field(default_factory=list)  # few-shot curve: K images per rank, per K
    shots_only: bool = False  # with shots: skip the runs on the whole training set

    @classmethod
    def create(cls, quick: bool = False, **given: Any) -> AccuracyConfig:
        """Defaults for a full or a ``--quick`` run; every option given (not None) wins. Unknown names fail here."""
        base = cls(**QUICK) if quick else cls()
        config = replace(base, **{key: value for key, value in given.items() if value is not None})
        for method in config.methods:
            if method not in METHODS:
                raise UsageError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        for kind in config.kinds:
            get_generator(kind)  # an unknown kind is a UsageError naming it
        if not config.seeds:
            raise UsageError("--seeds: give at least one seed")
        if any(k < 1 for k in config.shots):
            raise UsageError(f"--shots must be at least 1, got {min(config.shots)}")
        if config.shots_only and not config.shots:
            raise UsageError("--shots-only needs --shots")
        return config


def _train_config(method: str, epochs: int, seed: int, workers: int) -> TrainConfig:
    """The training configuration of ``method`` in the comparison (``workers`` changes the speed, not the result)."""
    recipe = dict(RECIPES.get(method, {}))
    epochs *= recipe.pop("epoch_scale", 1)
    return TrainConfig(method=method, epochs=epochs, batch_size=BATCH_SIZE, milestones=(max(1, round(0.75 * epochs)),),
                       seed=seed, workers=workers, **recipe)


def median_row(kind: str, train: Samples, test: Samples, task: TaskSpec) -> Row:
    """The predict-the-training-median baseline on the test set."""
    started = time.perf_counter()
    median = statistics.median(train.values)
    target = torch.tensor(test.values)
    true_bins = torch.tensor([task.bin_index(v) for v in test.values])
    guess = torch.full_like(true_bins, task.bin_index(median))
    return {"kind": kind, "method": MEDIAN, "mae": metrics.mae(torch.full_like(target, median), target),
            "mae_max": None, "accuracy": metrics.accuracy(guess, true_bins),
            "one_off": metrics.one_off_accuracy(guess, true_bins), "qwk": metrics.qwk(guess, true_bins, len(task.bins)),
            "seconds": time.perf_counter() - started}


def training_split(train: Samples, task: TaskSpec, epochs: int, seed: int,
                   shots: int | None = None) -> tuple[Samples, Samples, int]:
    """(fit, validation, epochs) of one run: the whole set minus a validation share, or ``shots`` images per
    rank with ``FEW_SHOT_VAL`` of the others for validation and epochs scaled towards ``FEW_SHOT_PASSES``."""
    if not shots:
        return (*split_validation(train, VAL_SPLIT, seed), epochs)
    fit_set, rest, _ = few_shot(train, task, shots, seed)
    _, val_set = split_validation(rest, min(FEW_SHOT_VAL, len(rest) - 1) / len(rest), seed)
    return fit_set, val_set, min(5 * epochs, max(epochs, math.ceil(FEW_SHOT_PASSES / len(fit_set))))


def _trained_model(method: str, task: TaskSpec, train: Samples, epochs: int, seed: int, device: torch.device,
                   folder: Path, shots: int | None = None) -> LoadedModel:
    """Train ``method`` from the seeded random init; return its best-on-validation checkpoint, loaded."""
    torch.manual_seed(seed)  # the same random backbone for every method
    backbone, _ = open_backbone(TINY_MODEL, "none", device)
    if not create_model(method, backbone, task).trainable_groups():
        return create_model_and_transforms(device, model=TINY_MODEL, pretrained="none", task=task, method=method)
    fit_set, val_set, epochs = training_split(train, task, epochs, seed, shots)
    out = folder / f"{method}.safetensors"
    workers = default_workers(len(fit_set), BATCH_SIZE, device.type)  # as `numclip train` picks them
    Trainer(backbone, task, _train_config(method, epochs, seed, workers), device).fit(fit_set, val_set, out)
    return create_model_and_transforms(device, checkpoint=out)


def run_accuracy_suite(config: AccuracyConfig, device: torch.device,
                       on_progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Train and test every method on every synthetic kind with every seed; one row per (kind, seed, shots,
    method) plus a median row per (kind, seed).

    Rows hold ``kind, method, seed, shots`` (None: the whole training set; K: K images per rank) ``, mae,
    mae_max`` (argmax readout, rank methods only, else None) ``, accuracy, one_off, qwk`` (coarse bins) and
    ``seconds`` (training + testing wall time); ``on_progress`` gets each row as soon as it is measured.
    ``bench.seeds.aggregate`` folds the seeds.
    """
    report = on_progress or (lambda _: None)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="numclip-compare-") as tmp:
        for seed in config.seeds:
            for kind in config.kinds:
                task, folder = task_spec(kind), Path(tmp) / f"{kind}-{seed}"
                write_dataset(kind, folder / "train", config.n_train, seed=seed)
                write_dataset(kind, folder / "test", config.n_test, seed=seed + TEST_SEED_OFFSET, split="test")
                train, test = load_samples(folder / "train", task), load_samples(folder / "test", task)
                rows.append({"kind": kind, "method": MEDIAN, "seed": seed, "shots": None,
                             **median_row(kind, train, test, task)})
                report(rows[-1])
                for shots in ([] if config.shots_only else [None]) + config.shots:
                    for method in config.methods:
                        rows.append(_scored_run(kind, method, train, test, config.epochs, seed, shots, device, folder))
                        report(rows[-1])
    return rows


def _scored_run(kind: str, method: str, train: Samples, test: Samples, epochs: int, seed: int,
                shots: int | None, device: torch.device, folder: Path) -> Row:
    """Train one method (on all of ``train`` or ``shots`` per rank) and score it on ``test``."""
    started = time.perf_counter()
    trained = _trained_model(method, task_spec(kind), train, epochs, seed, device, folder, shots)
    scores = evaluate(trained.model, test, trained.transform, device)
    return {"kind": kind, "method": method, "seed": seed, "shots": shots,
            "mae": scores["mae"], "mae_max": scores.get("mae_max"), "accuracy": scores["accuracy"],
            "one_off": scores["one_off"], "qwk": scores["qwk"], "seconds": time.perf_counter() - started}
