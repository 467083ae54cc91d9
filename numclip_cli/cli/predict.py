"""``numclip predict``: one record per input image, in input order, as a table, JSON lines or CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from numclip_cli.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    BatchSizeOpt,
    CheckpointOpt,
    DeviceOpt,
    ModelOpt,
    OfflineOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    Reporter,
    TaskOpt,
    Terminated,
    VerboseOpt,
    WorkersOpt,
    announce_device,
    handle_errors,
    prepare,
    stop_at_safe_points,
)


@handle_errors
def predict(
    paths: Annotated[list[str], typer.Argument(
        help="Image files, directories, globs, or '-' to read newline-separated paths from stdin.",
        show_default=False)],
    task: TaskOpt = None,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    output_format: Annotated[str | None, typer.Option(
        "--format", help="table, jsonl or csv (default: table on a terminal, else jsonl; "
                         "with --output, from its suffix).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write results to FILE atomically (temp file + rename) instead of stdout.")] = None,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="With --output FILE.jsonl: skip inputs already in FILE and append.")] = False,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    fast: Annotated[bool, typer.Option(
        "--fast", help="CPU: run the image tower as an int8 ONNX Runtime session, ~2x faster on ViT-B-16 (needs "
                       "numclip\\[fast]; `numclip bench` shows its speed-up and same-bin agreement here).")] = False,
    precision: PrecisionOpt = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="I/N: process every N-th input starting at I (N shards cover the input once).")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-directories.")] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated.")] = False,
    coverage: Annotated[float | None, typer.Option(
        "--coverage", help="With a calibrated checkpoint: add a prediction interval and a contiguous bin set "
                           "that hold the truth with this probability (e.g. 0.9).", show_default=False)] = None,
    faces: Annotated[str | None, typer.Option(
        "--faces", help="largest: predict on the largest face; all: one record per face; none: the whole image "
                        "(default: the task's, largest for age; needs numclip\\[face]). No face found: the whole "
                        "image, with \"face\": null.", show_default=False)] = None,
    face_margin: Annotated[float | None, typer.Option(
        "--face-margin", min=0.0, help="Added on every side of a face, as a share of its size (default: the "
                                       "checkpoint's training margin, else 0.4).")] = None,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Predict a number for every image (e.g. `numclip predict face.jpg --task age`)."""
    prepare(offline, verbose)
    from numclip_cli.errors import NumclipError, UsageError
    from numclip_cli.inputs import expand_inputs, parse_shard, take_shard
    from numclip_cli.writers import FORMATS

    fmt = output_format or _default_format(output)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if skip_existing and (output is None or fmt != "jsonl"):
        raise UsageError("--skip-existing needs --output FILE with --format jsonl")
    all_paths = expand_inputs(paths, stdin=sys.stdin, recursive=recursive, null=null)
    if shard:
        all_paths = take_shard(all_paths, *parse_shard(shard))
    if not all_paths:
        raise NumclipError("no inputs found")

    from numclip_cli.calibration import NEEDS_CALIBRATION, check_coverage, prediction_settings

    if coverage is not None:  # fail before loading a model
        check_coverage(coverage)
        if checkpoint is None:
            raise UsageError(NEEDS_CALIBRATION)
    from numclip_cli.faces import face_crops, resolve_mode

    if fast:  # the optional extra is checked before loading a model
        from numclip_cli.onnx_tower import require_fast_extra

        require_fast_extra()
    if faces is not None:  # an explicit --faces does not depend on the task: check it before loading a model
        resolve_mode(faces, "none")
    reporter = Reporter(quiet, verbose)
    dev = announce_device(device, reporter)
    from numclip_cli.precision import resolve_precision

    precision = resolve_precision(precision, dev).name  # a bad --precision fails before the model loads
    from numclip_cli.session import open_session

    session = open_session(dev, checkpoint=str(checkpoint) if checkpoint else None, model=model,
                           pretrained=pretrained, task=task)
    face_mode, face_warning = resolve_mode(faces, session.task.faces)
    for message in session.warnings + ([face_warning] if face_warning else []):
        reporter.warn(message)
    calibration = prediction_settings(session.checkpoint.calibration if session.checkpoint else None, coverage,
                                      str(checkpoint))
    counts, stopped = _run(session, calibration, all_paths, fmt, output, skip_existing, batch_size, workers,
                           reporter, fast, face_crops(face_mode, _margin(face_margin, session)), precision)
    if isinstance(stopped, RuntimeError):  # a decode worker died (killed for memory?); finished records are kept
        raise NumclipError(f"a decoding worker process died ({stopped}); --workers 0 decodes in the main process")
    if stopped is not None:
        raise typer.Exit(EXIT_SIGINT if isinstance(stopped, KeyboardInterrupt) else EXIT_SIGTERM)
    ok, failed = counts
    if ok == 0 and failed == 0:
        reporter.info("nothing to do: every input is already in the output")
        raise typer.Exit(EXIT_OK)
    if failed:
        reporter.warn(f"{failed} of {ok + failed} input(s) could not be used (see their error records)")
    raise typer.Exit(EXIT_FAILED if ok == 0 else EXIT_PARTIAL if failed else EXIT_OK)


def _margin(requested: float | None, session) -> float:
    """An explicit --face-margin, else the margin the checkpoint was trained with, else the default."""
    from numclip_cli.faces import DEFAULT_MARGIN

    if requested is not None:
        return requested
    trained = session.checkpoint.train.get("config", {}) if session.checkpoint else {}
    return float(trained.get("face_margin", DEFAULT_MARGIN))


def _default_format(output: Path | None) -> str:
    if output is not None:
        return "csv" if output.suffix.lower() == ".csv" else "jsonl"
    return "table" if sys.stdout.isatty() else "jsonl"


def _run(session, calibration, paths, fmt, output, skip_existing, batch_size, workers, reporter, fast=False,
         crops=None, precision=None):
    """Stream records into the chosen sink; an interrupt keeps every complete record and is returned."""
    import contextlib

    from numclip_cli.atomic import atomic_open
    from numclip_cli.predictor import Predictor, worker_died
    from numclip_cli.writers import appending, done_paths, make_writer

    if skip_existing and output.exists():
        done, good_bytes = done_paths(output)
        paths = [p for p in paths if p not in done]
        sink = appending(output, good_bytes)
    elif output is not None:
        sink = atomic_open(output, "w", encoding="utf-8", newline="")
    else:
        sink = contextlib.nullcontext(sys.stdout)

    temperature, conformal = calibration
    predictor = Predictor(session.model, next(session.model.parameters()).device, temperature, conformal, fast,
                          warn=reporter.warn, precision=precision)
    ok = failed = 0
    stopped: BaseException | None = None
    # the stop handler spans the commit too: a signal then waits until the file is complete
    with stop_at_safe_points(reporter.quiet) as stop, sink as stream, reporter.progress() as progress:
        writer = make_writer(fmt, stream, session.task.bin_names, session.task.unit)
        bar = progress.add_task("predict", total=len(paths), status="")
        try:
            # one group per input: a single record, or one per face with --faces all
            for group in predictor.input_records(paths, session.backbone.preprocess, batch_size, workers, crops):
                for record in group:
                    writer.write(record)
                if group[0]["status"] == "ok":
                    ok += 1
                else:
                    failed += 1
                progress.update(bar, advance=1, status=f"{failed} failed" if failed else "")
                if (ok + failed) % batch_size == 0:
                    writer.flush()
                    if stop.signum is not None:  # a batch boundary: every prediction made so far is written
                        break
        except (KeyboardInterrupt, Terminated) as exc:  # a second signal
            # new exception objects, not the caught ones: their tracebacks' frames hold the DataLoader, whose
            # decode workers must shut down now (before the commit), not at exit
            stopped = type(exc)()
        except Exception as exc:
            # a decode worker died: killed on its own (out of memory?), or by the stop signal sent to the group
            if stop.signum is None and not worker_died(exc):
                raise
            stopped = RuntimeError(" ".join(str(exc).split()))
        stopped = stop.exception() or stopped
        if stopped is not None:  # keep the complete records: the sink is committed below
            reporter.warn(f"stopped after {ok + failed} of {len(paths)} input(s); "
                          f"rerun with --skip-existing to continue" if output else "stopped")
        writer.close()
    return (ok, failed), stopped
