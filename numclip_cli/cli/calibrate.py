"""``numclip calibrate``: fit a temperature and conformal scores on held-out data and store them in the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from numclip_cli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    Reporter,
    VerboseOpt,
    WorkersOpt,
    announce_device,
    handle_errors,
    prepare,
)
from numclip_cli.cli.train import CacheDirOpt, NoCacheOpt, cache_summary, feature_cache_dir


@handle_errors
def calibrate(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="The numclip .safetensors checkpoint to calibrate (rewritten in place unless --out).",
        show_default=False)],
    data: Annotated[Path, typer.Option(
        "--data", help="Held-out labelled images (folder per label, CSV/TSV or list), not the training data.",
        show_default=False)],
    coverage: Annotated[float, typer.Option(
        "--coverage", help="Coverage of the conformal interval and bin set (predict --coverage may ask for "
                           "another).")] = 0.9,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the calibrated checkpoint here instead of rewriting --checkpoint.")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Draw a reliability diagram (before/after) to this PNG file.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the measured numbers as JSON.")] = None,
    ece_bins: Annotated[int, typer.Option("--ece-bins", min=2, help="Equal-width confidence bins for ECE and "
                                          "the reliability diagram.")] = 15,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Calibrate a checkpoint on held-out data (e.g. `numclip calibrate --checkpoint m.safetensors --data val/`)."""
    prepare(offline, verbose)
    import dataclasses

    from numclip_cli import calibration
    from numclip_cli.atomic import atomic_write_bytes
    from numclip_cli.checkpoint import load_model, write_checkpoint
    from numclip_cli.datasets import load_samples
    from numclip_cli.feature_cache import FeatureCache
    from numclip_cli.predictor import Predictor

    calibration.check_coverage(coverage)
    reporter = Reporter(quiet, verbose)
    dev = announce_device(device, reporter)
    from numclip_cli.precision import resolve_precision

    precision = resolve_precision(precision, dev).name  # a bad --precision fails before the model loads
    model, backbone, ckpt = load_model(checkpoint, dev)
    samples = load_samples(data, ckpt.task)
    if ckpt.calibration:
        reporter.info("the checkpoint is already calibrated: refitting from its uncalibrated outputs")
    reporter.info(f"running the model on {len(samples)} calibration image(s)")
    from numclip_cli.faces import ONE_VIEW_MODES, face_transform, resolve_mode

    # calibrate on the same kind of crop the checkpoint was trained and predicts on
    face_mode, face_warning = resolve_mode(None, ckpt.task.faces, ONE_VIEW_MODES)
    if face_warning:
        reporter.warn(face_warning)
    margin = float(ckpt.train.get("config", {}).get("face_margin", 0.4))
    transform = face_transform(face_mode, margin, backbone.preprocess)
    root = feature_cache_dir(cache_dir, no_cache)
    cache = None if root is None else FeatureCache.for_model(root, model, backbone.preprocess_cfg, face_mode, margin,
                                                             precision)
    held = calibration.collect(Predictor(model, dev, precision=precision, feature_cache=cache), samples, transform,
                               batch_size, workers)
    if cache is not None:
        reporter.info(cache_summary(cache))
    result = calibration.calibrate(held, ckpt.task, coverage, ece_bins,
                                   train_data=ckpt.train.get("data", {}).get("train"))
    for message in result.warnings:
        reporter.warn(message)
    target = out or checkpoint
    report = {"checkpoint": str(target), "data": held.source, "n": len(held), "skipped": held.skipped,
              "temperature": result.temperature, "ece_bins": ece_bins, "metrics": result.metrics,
              "conformal": calibration.conformal_summary(held, result.rule(), ckpt.task), "unit": ckpt.task.unit,
              "warnings": result.warnings}
    if plot:
        calibration.save_reliability_diagram(plot, held, result.temperature, ece_bins,
                                 title=f"Reliability diagram: task {ckpt.task.name!r}, {checkpoint.name}")
    if json_out:
        atomic_write_bytes(json_out, (json.dumps(report, indent=2) + "\n").encode())
    # the checkpoint last: a failed plot or JSON leaves it untouched
    write_checkpoint(target, dataclasses.replace(ckpt, calibration=result.to_metadata()))
    reporter.info(f"calibration stored in {target}")
    _print_tables(report)


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table = Table("metric", "before (T = 1)", f"after (T = {report['temperature']:.3g})",
                  title=f"calibration on {report['n']} image(s) of {report['data']}")
    for key, label in (("ece", f"ECE ({report['ece_bins']} bins)"), ("nll", "NLL"), ("brier", "Brier"),
                       ("rps", "RPS"), ("accuracy", "accuracy"), ("mae", "MAE")):
        table.add_row(label, f"{before[key]:.4f}", f"{after[key]:.4f}")
    conformal = report["conformal"]
    unit = f" {report['unit']}" if report["unit"] else ""
    sets = Table("conformal", "value", title=f"coverage {conformal['coverage']:g} (on the calibration data)")
    sets.add_row("interval: value ± q", f"± {conformal['interval_quantile']:.4g}{unit}")
    sets.add_row("interval coverage / mean width",
                 f"{conformal['interval_coverage']:.3f} / {conformal['mean_interval_width']:.4g}{unit}")
    sets.add_row("bin set: threshold", f"{conformal['set_threshold']:.4g}")
    sets.add_row("bin set coverage / mean size", f"{conformal['set_coverage']:.3f} / "
                 f"{conformal['mean_set_size']:.2f} bins")
    console = Console()
    console.print(table)
    console.print(sets)
