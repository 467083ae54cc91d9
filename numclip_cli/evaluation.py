"""Running a model over labelled images, through the same ``Predictor`` path that ``numclip predict`` uses.

``collect`` gathers the uncalibrated outputs that calibration fits on; ``evaluate`` turns them into the headline
metrics (MAE, accuracy, 1-off, QWK, RPS) that the accuracy benchmark reports.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from numclip_cli import metrics
from numclip_cli.calibration import HeldOut
from numclip_cli.datasets import Samples
from numclip_cli.model.methods import OrdinalModel
from numclip_cli.predictor import Predictor


def collect(predictor: Predictor, samples: Samples, transform: Callable, batch_size: int = 32,
            workers: int | None = None) -> HeldOut:
    """Run the predictor over labelled samples; unreadable images are counted and left out."""
    logits, values, values_max, kept = [], [], [], []
    for batch, preds in predictor.outputs(samples.paths, transform, batch_size, workers):
        if not preds:
            continue
        logits.append(preds["bin_logits"])
        values.append(preds["value"])
        if "value_max" in preds:
            values_max.append(preds["value_max"])
        kept.extend(i for i in batch.indices if i not in batch.errors)
    targets = torch.tensor([samples.values[i] for i in kept], dtype=torch.float64)
    bins = torch.tensor([predictor.task.bin_index(samples.values[i]) for i in kept], dtype=torch.long)
    empty = torch.zeros(0, len(predictor.task.bins))
    return HeldOut(bin_logits=torch.cat(logits).double() if logits else empty,
                   values=torch.cat(values).double() if values else torch.zeros(0),
                   targets=targets, bins=bins, source=samples.source, skipped=len(samples) - len(kept),
                   values_max=torch.cat(values_max).double() if values_max else None)


def evaluate(model: OrdinalModel, samples: Samples, transform: Callable, device: torch.device,
             batch_size: int = 64) -> dict[str, float]:
    """Test metrics of a model on labelled samples (``mae_max`` too for methods with an argmax readout)."""
    held = collect(Predictor(model, device), samples, transform, batch_size, workers=0)
    return metrics.summarize(model.task, held.values, held.targets, held.probs(), value_max=held.values_max)
