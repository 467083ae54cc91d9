"""Method comparison on the synthetic ordinal suites: every ``--method`` against predict-the-median.

For each synthetic kind a seeded training set and a test set (another seed, so no image is shared) are
written to a temporary folder. Each method is trained on ``numclip-tiny`` from the same random
initialisation, its checkpoint is chosen on a validation split of the *training* data (never on the test
set), and the chosen checkpoint is scored on the test set through the same ``Predictor`` that
``numclip predict`` uses. ``zeroshot`` is not trained: on a randomly initialised backbone it shows what
untrained prompts give (chance).

With several ``--seeds`` every (kind, method) is repeated with each seed (data, initialisation and training all
change) and the tables show mean ± standard deviation (``numclip_cli.seed_stats``). ``--shots 1,2,4,8`` adds the
few-shot curve: each method trained on K images per rank drawn from the training set (``datasets.few_shot``),
validated on images it was not trained on, and tested on the same test set.

Run ``python -m numclip_cli.comparison`` for the README's markdown table (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from numclip_cli import metrics, seed_stats
from numclip_cli.backbone import TINY_MODEL, Backbone, load_backbone, resolve_device
from numclip_cli.checkpoint import load_model
from numclip_cli.datasets import LabelledImages, Samples, collate_labelled, few_shot, load_samples, split_validation
from numclip_cli.errors import UsageError
from numclip_cli.model.methods import METHODS, OrdinalModel, create_model
from numclip_cli.predictor import Predictor
from numclip_cli.synthetic import get_generator, task_spec, write_dataset
from numclip_cli.tasks import TaskSpec
from numclip_cli.trainer import TrainConfig, Trainer

MEDIAN = "median"
DEFAULT_KINDS = ("dots", "fill")
VAL_SPLIT = 0.1  # share of the training set held out to choose each method's best epoch
TEST_SEED_OFFSET = 1  # the test set is drawn with seed + 1: other labels, other pictures
COLUMNS = ("mae", "mae_max", "accuracy", "one_off", "qwk", "seconds")
FEW_SHOT_VAL = 60  # validation images for a few-shot run, drawn from the images it does not train on
# A few-shot set is small: its epochs grow so that it gets about FEW_SHOT_PASSES image passes, between the
# suite's --epochs and 5× them (10 images per epoch would otherwise be a handful of optimiser steps).
FEW_SHOT_PASSES = 600

# Per-method settings on numclip-tiny from random init (batch 16, RAdam, LR ×0.1 after 3/4 of the epochs).
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
# Batch 16, not 64: on 300 training images × 6 epochs batch 64 is 24 optimiser steps, and no method learned
# anything from random init (dots test MAE 2.54 for numclip, median 2.60); batch 16 (102 steps, same compute)
# gave 1.08. A random-init backbone is limited by steps, not by the batch's gradient noise.
BATCH_SIZE = 16


def _config(method: str, epochs: int, seed: int) -> TrainConfig:
    """The training configuration of ``method`` in the comparison."""
    recipe = dict(RECIPES.get(method, {}))
    epochs *= recipe.pop("epoch_scale", 1)
    return TrainConfig(method=method, epochs=epochs, batch_size=BATCH_SIZE, milestones=(max(1, round(0.75 * epochs)),),
                       seed=seed, **recipe)


def _test_batches(samples: Samples, task: TaskSpec, transform: Callable) -> DataLoader:
    """Test images in order, preprocessed as ``numclip predict`` does."""
    return DataLoader(LabelledImages(samples, task, transform), batch_size=BATCH_SIZE, shuffle=False,
                      num_workers=0, collate_fn=collate_labelled)


def evaluate(model: OrdinalModel, samples: Samples, transform: Callable, device: torch.device) -> dict[str, float]:
    """Test metrics of a model through the ``predict`` path (text features computed once)."""
    predictor = Predictor(model, device)
    parts: dict[str, list[torch.Tensor]] = {"value": [], "value_max": [], "probs": [], "target": []}
    for batch in _test_batches(samples, model.task, transform):
        if "images" not in batch:
            continue
        pred = predictor.predict_images(batch["images"])
        for name in ("value", "value_max", "probs"):
            if name in pred:
                parts[name].append(pred[name])
        parts["target"].append(batch["values"])
    out = {name: torch.cat(chunks) for name, chunks in parts.items() if chunks}
    return metrics.summarize(model.task, out["value"], out["target"], out["probs"], value_max=out.get("value_max"))


def median_row(kind: str, train: Samples, test: Samples, task: TaskSpec) -> dict[str, Any]:
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
                   folder: Path, shots: int | None = None) -> tuple[OrdinalModel, Backbone]:
    """Train ``method`` from the seeded random init; return its best-on-validation checkpoint, loaded."""
    torch.manual_seed(seed)  # the same random backbone for every method
    backbone = load_backbone(TINY_MODEL, "none", device=device)
    model = create_model(method, backbone, task)
    if not model.trainable_groups():
        return model.eval(), backbone
    fit_set, val_set, epochs = training_split(train, task, epochs, seed, shots)
    out = folder / f"{method}.safetensors"
    Trainer(backbone, task, _config(method, epochs, seed), device).fit(fit_set, val_set, out)
    model, backbone, _ = load_model(out, device)
    return model, backbone


def run_accuracy_suite(kinds: list[str], methods: list[str], n_train: int, n_test: int, epochs: int,
                       seeds: Sequence[int], device: Any, on_progress: Callable[[dict[str, Any]], None] | None = None,
                       shots: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Train and test every method on every synthetic kind with every seed; one row per (kind, seed, shots,
    method) plus a median row per (kind, seed).

    Rows hold ``kind, method, seed, shots`` (None: the whole training set; K: K images per rank), ``mae,
    mae_max`` (argmax readout, rank methods only, else None) ``, accuracy, one_off, qwk`` (coarse bins) and
    ``seconds`` (training + testing wall time); ``on_progress`` gets each row as soon as it is measured.
    Fold the seeds with ``seed_stats.aggregate``.
    """
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    for kind in kinds:
        get_generator(kind)  # an unknown kind fails before any training
    if any(k < 1 for k in shots):
        raise UsageError(f"--shots must be at least 1, got {min(shots)}")
    device = resolve_device(device) if isinstance(device, str) else device
    report = on_progress or (lambda _: None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="numclip-compare-") as tmp:
        for seed in seeds:
            for kind in kinds:
                task, folder = task_spec(kind), Path(tmp) / f"{kind}-{seed}"
                write_dataset(kind, folder / "train", n_train, seed=seed)
                write_dataset(kind, folder / "test", n_test, seed=seed + TEST_SEED_OFFSET, split="test")
                train, test = load_samples(folder / "train", task), load_samples(folder / "test", task)
                rows.append({**median_row(kind, train, test, task), "seed": seed, "shots": None})
                report(rows[-1])
                for k in [None, *shots]:
                    for method in methods:
                        started = time.perf_counter()
                        model, backbone = _trained_model(method, task, train, epochs, seed, device, folder, k)
                        scores = evaluate(model, test, backbone.preprocess, device)
                        rows.append({"kind": kind, "method": method, "seed": seed, "shots": k, "mae": scores["mae"],
                                     "mae_max": scores.get("mae_max"), "accuracy": scores["accuracy"],
                                     "one_off": scores["one_off"], "qwk": scores["qwk"],
                                     "seconds": time.perf_counter() - started})
                        report(rows[-1])
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table (numbers to 3 decimals, seconds to 1, missing values as –)."""
    lines = ["| kind | method | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = ["–" if row.get(c) is None else f"{row[c]:.1f}" if c == "seconds" else f"{row[c]:.3f}"
                 for c in COLUMNS]
        lines.append(f"| {row['kind']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: run the suite and print the markdown tables on stdout (progress on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m numclip_cli.comparison", description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated synthetic kinds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--n-train", type=int, default=300, help="training images per kind")
    parser.add_argument("--n-test", type=int, default=200, help="test images per kind")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per method (×5 for linear-probe)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of data, initialisation, training")
    parser.add_argument("--shots", default="", help="few-shot curve: comma-separated K (images per rank)")
    parser.add_argument("--json", type=Path, help="write every per-seed row and the folded rows as JSON")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)

    def progress(row: dict[str, Any]) -> None:
        print(f"{row['kind']:>6} {row['method']:<13} seed {row['seed']} shots {row['shots']} MAE {row['mae']:.3f}"
              f"  ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    rows = run_accuracy_suite(args.kinds.split(","), args.methods.split(","), args.n_train, args.n_test,
                              args.epochs, _ints(args.seeds), args.device, on_progress=progress,
                              shots=_ints(args.shots))
    folded = seed_stats.aggregate(rows)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": rows,
                                         "summary": folded}, indent=1) + "\n")
    print(seed_stats.mae_table(folded))
    if args.shots:
        print()
        print(seed_stats.shots_table(folded))


if __name__ == "__main__":
    main()
