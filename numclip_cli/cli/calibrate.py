"""``numclip calibrate``: fit a temperature and conformal scores on held-out data and store them in the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from numclip_cli.cli.common import (
    MAX_SEED,
    BatchSizeOpt,
    CacheDirOpt,
    DeviceOpt,
    NoCacheOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    Reporter,
    VerboseOpt,
    WorkersOpt,
    announce_device,
    cache_summary,
    feature_cache_dir,
    handle_errors,
    prepare,
)


@handle_errors
def calibrate(
    ctx: typer.Context,
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
    conformal: Annotated[str, typer.Option(
        "--conformal", help="global: one interval width and set threshold for all images (coverage on average); "
                            "per-bin: one per true bin, so images of every bin get the coverage and intervals "
                            "widen where the model errs more.")] = "global",
    holdout: Annotated[float, typer.Option(
        "--holdout", help="Share of --data (of every bin, seeded) kept out of the fit to measure the coverage and "
                          "metrics the calibration achieves; 0 fits on all of it and measures nothing.")] = 0.25,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed of the held-out split.")] = 0,
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
    from numclip_cli.checkpoint import write_checkpoint
    from numclip_cli.datasets import load_samples
    from numclip_cli.errors import UsageError
    from numclip_cli.evaluation import collect
    from numclip_cli.factory import SHIPPED_CHECKPOINTS, create_model_and_transforms
    from numclip_cli.feature_cache import FeatureCache
    from numclip_cli.locking import claim_outputs, refuse_inputs_as_outputs
    from numclip_cli.predictor import Predictor

    calibration.check_coverage(coverage)
    calibration.check_mode(conformal)
    calibration.check_holdout(holdout)
    if out is None and str(checkpoint) in SHIPPED_CHECKPOINTS:
        raise UsageError(f"{checkpoint} is a shipped checkpoint: write the calibrated copy with --out FILE")
    # outputs are checked and locked before any work, until the command ends
    outputs = [("--out", out) if out else ("--checkpoint", checkpoint), ("--plot", plot), ("--json", json_out)]
    ctx.with_resource(claim_outputs(*outputs))
    reporter = Reporter(quiet, verbose)
    dev = announce_device(device, reporter)
    from numclip_cli.precision import resolve_precision

    precision = resolve_precision(precision, dev).name  # a bad --precision fails before the model loads
    loaded = create_model_and_transforms(dev, checkpoint=checkpoint)
    model, ckpt = loaded.model, loaded.checkpoint
    samples = load_samples(data, ckpt.task)
    refuse_inputs_as_outputs(  # the checkpoint itself may be rewritten in place (no --out): it is read by then
        outputs[1:] if out is None else outputs,
        [("--checkpoint", checkpoint), ("--data", data), *(("the image", path) for path in samples.paths)])
    if ckpt.calibration:
        reporter.info("the checkpoint is already calibrated: refitting from its uncalibrated outputs")
    reporter.info(f"running the model on {len(samples)} calibration image(s)")
    from numclip_cli.faces import ONE_VIEW_MODES, face_transform, resolve_mode

    # calibrate on the same kind of crop the checkpoint was trained and predicts on
    face_mode, face_warning = resolve_mode(None, loaded.preprocess.faces, ONE_VIEW_MODES)
    if face_warning:
        reporter.warn(face_warning)
    margin = loaded.preprocess.face_margin
    transform = face_transform(face_mode, margin, loaded.transform)
    root = feature_cache_dir(cache_dir, no_cache)
    cache = None if root is None else FeatureCache.for_model(root, model, loaded.preprocess.image, face_mode, margin,
                                                             precision)
    held = collect(Predictor(model, dev, precision=precision, feature_cache=cache), samples, transform, batch_size,
                   workers)
    if cache is not None:
        reporter.info(cache_summary(cache))
    result = calibration.calibrate(held, ckpt.task, coverage, ece_bins,
                                   train_data=ckpt.train.get("data", {}).get("train"), holdout=holdout, seed=seed,
                                   conformal=conformal)
    for message in result.warnings:
        reporter.warn(message)
    target = out or checkpoint
    report = {"checkpoint": str(target), "data": held.source, "n": len(held), **result.holdout,
              "skipped": held.skipped, "nonfinite": held.nonfinite, "temperature": result.temperature,
              "ece_bins": ece_bins, "metrics_on": "held-out" if result.achieved else "calibration",
              "metrics": result.metrics,
              "conformal": {"mode": conformal, "coverage": coverage, "bins": ckpt.task.bin_names,
                            **calibration.thresholds(result.rule())},
              "achieved": result.achieved, "unit": ckpt.task.unit, "warnings": result.warnings}
    if plot:
        from numclip_cli.plotting import save_reliability_diagram

        # on the part the table's metrics come from: the temperature was not fitted on it
        shown = calibration.split_held(held, holdout, seed)[1] if result.achieved else held
        save_reliability_diagram(plot, shown, result.temperature, ece_bins,
                                 title=f"Reliability diagram: task {ckpt.task.name!r}, {checkpoint.name}")
    if json_out:
        atomic_write_bytes(json_out, (json.dumps(report, indent=2) + "\n").encode())
    # the checkpoint last: a failed plot or JSON leaves it untouched
    write_checkpoint(target, dataclasses.replace(ckpt, calibration=result.to_metadata()))
    reporter.info(f"calibration stored in {target}")
    _print_tables(report)


# metric key → label, in the order the table shows them (keys a report lacks are skipped)
_METRIC_ROWS = (("ece", "ECE ({ece_bins} bins)"), ("nll", "NLL"), ("brier", "Brier"), ("rps", "RPS"), ("mae", "MAE"),
                ("mae_max", "MAE, argmax rank"), ("mae_levels", "MAE in levels (Σ p·k)"),
                ("mae_levels_max", "MAE in levels (argmax)"), ("accuracy", "accuracy (bin)"),
                ("rank_accuracy", "rank accuracy"), ("one_off", "1-off accuracy"), ("qwk", "QWK"))


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = report["metrics"]["before"], report["metrics"]["after"]
    unit = f" {report['unit']}" if report["unit"] else ""
    where = (f"{report['n_check']} held-out image(s) of {report['data']} (fitted on the other {report['n_fit']})"
             if report["achieved"] else f"the {report['n_fit']} calibration image(s) of {report['data']}")
    table = Table("metric", "before (T = 1)", f"after (T = {report['temperature']:.3g})", title=f"on {where}",
                  caption=f"MAE and CS@L in{unit}" if unit else None)
    rows = [*_METRIC_ROWS, *((key, key.replace("cs@", "CS@")) for key in before if key.startswith("cs@"))]
    for key, label in rows:
        if key in before:
            table.add_row(label.format(ece_bins=report["ece_bins"]), f"{before[key]:.4f}", f"{after[key]:.4f}")
    console = Console()
    console.print(table)
    console.print(_conformal_table(report, unit))


def _conformal_table(report: dict[str, Any], unit: str) -> Any:
    """The thresholds and, per true bin and overall, the coverage achieved on the held-out part."""
    from rich.table import Table

    conformal, achieved = report["conformal"], report["achieved"]
    per_bin = conformal["mode"] == "per-bin"
    title = f"conformal ({conformal['mode']}) at coverage {conformal['coverage']:g}: "
    if not per_bin:
        title += f"interval value ± {conformal['interval']:.4g}{unit}, bin set threshold {conformal['set']:.3f}; "
    title += (f"achieved on {achieved['n']} held-out image(s), ± {achieved['standard_error']:.3f} by chance"
              if achieved else "achieved coverage not measured (nothing held out)")
    if not (achieved or per_bin):
        return title  # nothing per bin to show
    table = Table("bin", *(("± q", "set ≤") if per_bin else ()), "images", "interval cov.", "mean width",
                  "set cov.", "mean set size", title=title)
    rows = [*achieved["per_bin"], {"bin": "all", **achieved}] if achieved else [{"bin": b} for b in conformal["bins"]]
    for k, row in enumerate(rows):
        limits = ()
        if per_bin:  # null stands for "always": too few calibration images in the bin
            limits = ((_cell(conformal["interval"][k], ".4g", "always"), _cell(conformal["set"][k], ".3f", "always"))
                      if k < len(conformal["bins"]) else ("", ""))
        table.add_row(str(row["bin"]), *limits, _cell(row.get("n"), "d"), _cell(row.get("interval_coverage"), ".3f"),
                      _cell(row.get("mean_interval_width"), ".4g"), _cell(row.get("set_coverage"), ".3f"),
                      _cell(row.get("mean_set_size"), ".2f"))
    return table


def _cell(value: float | None, digits: str, missing: str = "–") -> str:
    return missing if value is None else format(value, digits)
