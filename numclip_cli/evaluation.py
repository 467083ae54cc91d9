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
from numclip_cli.errors import DataError
from numclip_cli.model.methods import OrdinalModel
from numclip_cli.predictor import Predictor


def collect(predictor: Predictor, samples: Samples, transform: Callable, batch_size: int = 32,
            workers: int | None = None) -> HeldOut:
    """Run the predictor over labelled samples; unreadable images and non-finite outputs are counted and left out.

    One NaN would turn every mean, the fitted temperature and every conformal quantile into NaN, so a row whose
    value, argmax readout or bin probabilities are not finite is dropped (``HeldOut.nonfinite`` counts them).
    Raises ``DataError`` when images were read but every one of them gave non-finite outputs.
    """
    logits, values, values_max, kept = [], [], [], []
    for batch, preds in predictor.outputs(samples.paths, transform, batch_size, workers):
        if not preds:
            continue
        logits.append(preds["bin_logits"])
        values.append(preds["value"])
        if "value_max" in preds:
            values_max.append(preds["value_max"])
        kept.extend(i for i in batch.indices if i not in batch.errors)
    empty = torch.zeros(0, len(predictor.task.bins))
    held = HeldOut(bin_logits=torch.cat(logits).double() if logits else empty,
                   values=torch.cat(values).double() if values else torch.zeros(0),
                   targets=torch.tensor([samples.values[i] for i in kept], dtype=torch.float64),
                   bins=torch.tensor([predictor.task.bin_index(samples.values[i]) for i in kept], dtype=torch.long),
                   source=samples.source, skipped=len(samples) - len(kept),
                   values_max=torch.cat(values_max).double() if values_max else None)
    finite = finite_rows(held)
    if bool(finite.all()):
        return held
    if not bool(finite.any()):
        raise DataError(f"the model gave non-finite outputs (NaN/inf) for all {len(held)} readable image(s) in "
                        f"{samples.source}: the checkpoint is damaged or its training diverged")
    held = held.subset(finite)
    held.nonfinite = int((~finite).sum())
    return held


def finite_rows(held: HeldOut) -> torch.Tensor:
    """Rows with a finite value (and argmax readout) and well-defined bin probabilities.

    A logit of −inf is legitimate (a bin holding no rank has probability 0); NaN, +inf, or every logit −inf
    is not.
    """
    logits = held.bin_logits
    ok = torch.isfinite(held.values) & ~(logits.isnan() | (logits == torch.inf)).any(dim=1)
    ok &= logits.amax(dim=1) > -torch.inf
    if held.values_max is not None:
        ok &= torch.isfinite(held.values_max)
    return ok


def evaluate(model: OrdinalModel, samples: Samples, transform: Callable, device: torch.device,
             batch_size: int = 64) -> dict[str, float]:
    """Test metrics of a model on labelled samples (``mae_max`` too for methods with an argmax readout).

    Images with non-finite outputs are left out of the metrics and counted in ``nonfinite`` (present only then).
    """
    held = collect(Predictor(model, device), samples, transform, batch_size, workers=0)
    scores = metrics.summarize(model.task, held.values, held.targets, held.probs(), value_max=held.values_max)
    if held.nonfinite:
        scores["nonfinite"] = float(held.nonfinite)
    return scores
