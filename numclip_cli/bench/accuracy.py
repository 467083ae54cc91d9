"""The accuracy suite: every ``--method`` against predict-the-median on the synthetic ordinal suites.

For each synthetic kind a seeded training set and a test set (another seed, so no image is shared) are
written to a temporary folder. Each method is trained on ``numclip-tiny`` from the same random
initialisation, its checkpoint is chosen on a validation split of the *training* data (never on the test
set), and the chosen checkpoint is scored on the test set through the same ``Predictor`` that
``numclip predict`` uses. ``zeroshot`` is not trained: on a randomly initialised backbone it shows what
untrained prompts give (chance). ``numclip bench --suite accuracy --markdown`` prints the README's table.
"""

from __future__ import annotations

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
from numclip_cli.datasets import Samples, load_samples, split_validation
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
QUICK = {"n_train": 120, "n_test": 60, "epochs": 1}

# Per-method settings on numclip-tiny from random init (batch 64, RAdam, LR ×0.1 after 3/4 of the epochs).
# Every prompt method tunes the image tower (random features carry little), prompts at lr 3e-3, image tower at
# 1e-3 -- the NumCLIP demo recipe, kept for all so the comparison is about the methods, not the tuning. The
# linear probe trains only its head on cached features: an epoch costs milliseconds, so it gets 5× the
# epochs and a higher lr. Chosen on the validation split of seed 0; the test split was never looked at.
RECIPES: dict[str, dict[str, Any]] = {
    "numclip": {"lr": 3e-3, "image_lr": 1e-3, "tune_context": True},
    "l2rclip": {"lr": 3e-3, "image_lr": 1e-3},
    "ordinalclip": {"lr": 3e-3, "image_lr": 1e-3},
    "coop": {"lr": 3e-3, "image_lr": 1e-3},
    "linear-probe": {"lr": 1e-2, "epoch_scale": 5},
}
BATCH_SIZE = 64

Row = dict[str, Any]


@dataclass
class AccuracyConfig:
    """Which methods run on which synthetic kinds, and how much data and training each gets."""

    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    n_train: int = 900  # training images per kind (10 % of them choose the best epoch)
    n_test: int = 300  # test images per kind, drawn with another seed
    epochs: int = 8  # per method (×5 for the linear probe)
    seed: int = 0  # of the data, the initialisation and training

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
        return config


def _train_config(method: str, epochs: int, seed: int) -> TrainConfig:
    """The training configuration of ``method`` in the comparison."""
    recipe = dict(RECIPES.get(method, {}))
    epochs *= recipe.pop("epoch_scale", 1)
    return TrainConfig(method=method, epochs=epochs, batch_size=BATCH_SIZE, milestones=(max(1, round(0.75 * epochs)),),
                       seed=seed, **recipe)


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


def _trained_model(method: str, task: TaskSpec, train: Samples, epochs: int, seed: int, device: torch.device,
                   folder: Path) -> LoadedModel:
    """Train ``method`` from the seeded random init; return its best-on-validation checkpoint, loaded."""
    torch.manual_seed(seed)  # the same random backbone for every method
    backbone, _ = open_backbone(TINY_MODEL, "none", device)
    if not create_model(method, backbone, task).trainable_groups():
        return create_model_and_transforms(device, model=TINY_MODEL, pretrained="none", task=task, method=method)
    fit_set, val_set = split_validation(train, VAL_SPLIT, seed)
    out = folder / f"{method}.safetensors"
    Trainer(backbone, task, _train_config(method, epochs, seed), device).fit(fit_set, val_set, out)
    return create_model_and_transforms(device, checkpoint=out)


def run_accuracy_suite(config: AccuracyConfig, device: torch.device,
                       on_progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Train and test every method on every synthetic kind; one row per (kind, method) plus the median row.

    Rows hold ``kind, method, mae, mae_max`` (argmax readout, rank methods only, else None) ``, accuracy,
    one_off, qwk`` (coarse bins) and ``seconds`` (training + testing wall time); ``on_progress`` gets each
    row as soon as it is measured.
    """
    report = on_progress or (lambda _: None)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="numclip-compare-") as tmp:
        for kind in config.kinds:
            task, folder = task_spec(kind), Path(tmp) / kind
            write_dataset(kind, folder / "train", config.n_train, seed=config.seed)
            write_dataset(kind, folder / "test", config.n_test, seed=config.seed + TEST_SEED_OFFSET, split="test")
            train, test = load_samples(folder / "train", task), load_samples(folder / "test", task)
            rows.append(median_row(kind, train, test, task))
            report(rows[-1])
            for method in config.methods:
                started = time.perf_counter()
                trained = _trained_model(method, task, train, config.epochs, config.seed, device, folder)
                scores = evaluate(trained.model, test, trained.transform, device)
                rows.append({"kind": kind, "method": method, "mae": scores["mae"], "mae_max": scores.get("mae_max"),
                             "accuracy": scores["accuracy"], "one_off": scores["one_off"], "qwk": scores["qwk"],
                             "seconds": time.perf_counter() - started})
                report(rows[-1])
    return rows
