"""``numclip predict``: one record per input image, in input order, as a table, JSON lines or CSV."""

from __future__ import annotations

import contextlib
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
    non_negative,
    prepare,
    stop_at_safe_points,
    task_file,
)


@handle_errors
def predict(
    ctx: typer.Context,
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
        "--output", "-o", help="Write results to FILE instead of stdout: atomically (temp file + rename; a symlink "
                                "is written through), or straight into a device or FIFO.")] = None,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="With --output FILE.jsonl: write records straight into FILE (resumable after any "
                                "interruption) and skip inputs it already holds (same file = same resolved path; "
                                "an input listed twice gets two records).")] = False,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    fast: Annotated[bool, typer.Option(
        "--fast", help="CPU: run the image tower as an int8 ONNX Runtime session, ~2x faster on ViT-B-16 (needs "
                       "numclip[fast]; `numclip bench` shows its speed-up and same-bin agreement here).")] = False,
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
                        "(default: the task's, largest for age; needs numclip[face]). No face found: the whole "
                        "image, with \"face\": null.", show_default=False)] = None,
    face_margin: Annotated[float | None, typer.Option(
        "--face-margin", callback=non_negative, help="Added on every side of a face, as a share of its size "
                                                     "(default: the checkpoint's training margin, else 0.4).")] = None,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Predict a number for every image (e.g. `numclip predict face.jpg --task age`)."""
    prepare(offline, verbose)
    from numclip_cli.calibration import NEEDS_CALIBRATION, check_coverage, prediction_settings
    from numclip_cli.errors import NumclipError, UsageError
    from numclip_cli.faces import face_crops, resolve_mode
    from numclip_cli.inputs import parse_shard
    from numclip_cli.locking import claim_outputs, refuse_inputs_as_outputs
    from numclip_cli.writers import FORMATS

    fmt = output_format or _default_format(output)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if skip_existing and (output is None or fmt != "jsonl"):
        raise UsageError("--skip-existing needs --output FILE with --format jsonl")
    shard_at = parse_shard(shard) if shard else None
    if coverage is not None:  # fail before loading a model
        check_coverage(coverage)
        if checkpoint is None:
            raise UsageError(NEEDS_CALIBRATION)
    if fast:  # the optional extra is checked before loading a model
        from numclip_cli.onnx_tower import require_fast_extra

        require_fast_extra()
    if faces is not None:  # an explicit --faces does not depend on the task: check it before loading a model
        resolve_mode(faces, "none")
    # checked and locked before any work; the lock is released when the command ends
    ctx.with_resource(claim_outputs(("--output", output)))
    if skip_existing and not _regular_or_missing(output):
        raise UsageError(f"--skip-existing needs a regular file as --output, not {output}")
    reporter = Reporter(quiet, verbose)
    all_paths, resume_at = _inputs_to_do(paths, recursive, null, shard_at, output if skip_existing else None,
                                         reporter)
    refuse_inputs_as_outputs([("--output", output)], [("--checkpoint", checkpoint), ("--task", task_file(task)),
                                                      *(("the input", path) for path in all_paths)])
    if not all_paths:  # success with an empty, valid output (cut back to its complete records when resuming)
        with _sink(output, resume_at):
            pass
        raise typer.Exit(EXIT_OK)
    dev = announce_device(device, reporter)
    from numclip_cli.factory import create_model_and_transforms
    from numclip_cli.precision import resolve_precision

    precision = resolve_precision(precision, dev).name  # a bad --precision fails before the model loads

    session = create_model_and_transforms(dev, checkpoint=checkpoint, model=model, pretrained=pretrained, task=task)
    face_mode, face_warning = resolve_mode(faces, session.preprocess.faces)
    for message in session.warnings + ([face_warning] if face_warning else []):
        reporter.warn(message)
    calibration = prediction_settings(session.checkpoint.calibration if session.checkpoint else None, coverage,
                                      str(checkpoint))
    counts, stopped = _run(session, calibration, all_paths, fmt, output, resume_at, batch_size, workers,
                           reporter, fast, face_crops(face_mode, session.preprocess.face_margin
                                                      if face_margin is None else face_margin), precision)
    if isinstance(stopped, RuntimeError):  # a decode worker died (killed for memory?); finished records are kept
        raise NumclipError(f"a decoding worker process died ({stopped}); --workers 0 decodes in the main process")
    if stopped is not None:
        raise typer.Exit(EXIT_SIGINT if isinstance(stopped, KeyboardInterrupt) else EXIT_SIGTERM)
    ok, failed = counts
    if failed:
        reporter.warn(f"{failed} of {ok + failed} input(s) could not be used (see their error records)")
    raise typer.Exit(EXIT_FAILED if ok == 0 else EXIT_PARTIAL if failed else EXIT_OK)


def _inputs_to_do(args: list[str], recursive: bool, null: bool, shard_at: tuple[int, int] | None,
                  resuming: Path | None, reporter: Reporter) -> tuple[list[str], int | None]:
    """The inputs this run predicts, in order (its shard, minus those ``resuming`` already holds), and where
    appending to ``resuming`` starts. An empty shard or a finished output is said on stderr, not an error."""
    from numclip_cli.errors import NumclipError
    from numclip_cli.inputs import STDIN, expand_inputs, take_shard
    from numclip_cli.writers import done_inputs, remaining

    if STDIN in args and sys.stdin is not None and sys.stdin.isatty():
        reporter.info("reading paths from stdin (one per line; Ctrl-D to end)")
    paths = expand_inputs(args, stdin=sys.stdin, recursive=recursive, null=null)
    if not paths:
        raise NumclipError("no inputs found" + _subfolder_hint(args, recursive))
    if shard_at:
        total = len(paths)
        paths = take_shard(paths, *shard_at)
        if not paths:  # more shards than inputs: an array job's spare task succeeds with an empty output
            reporter.info(f"shard {shard_at[0]}/{shard_at[1]} has no inputs ({total} input(s) in all)")
    if resuming is None:
        return paths, None
    done, resume_at = done_inputs(resuming)
    if paths and done:
        paths = remaining(paths, done)
        if not paths:
            reporter.info("nothing to do: every input is already in the output")
    return paths, resume_at


def _subfolder_hint(args: list[str], recursive: bool) -> str:
    """Why a folder gave no inputs, when its images may sit in sub-folders."""
    import os

    if recursive:
        return ""
    for arg in args:
        if os.path.isdir(arg):
            with os.scandir(arg) as entries:
                if any(entry.is_dir() for entry in entries):
                    return f" ({arg} has sub-folders: add --recursive)"
    return ""


def _regular_or_missing(path: Path) -> bool:
    from numclip_cli.atomic import is_stream, target_mode

    mode = target_mode(path)
    return mode is None or not is_stream(mode)


def _default_format(output: Path | None) -> str:
    if output is not None:
        return "csv" if output.suffix.lower() == ".csv" else "jsonl"
    return "table" if sys.stdout.isatty() else "jsonl"


def _sink(output: Path | None, resume_at: int | None):
    """Where records go: appended in place after the first ``resume_at`` bytes (``--skip-existing``, resumable),
    an atomic rewrite of ``output``, or stdout."""
    from numclip_cli.atomic import atomic_open
    from numclip_cli.writers import appending

    if resume_at is not None:
        return appending(output, resume_at)
    if output is not None:
        return atomic_open(output, "w", encoding="utf-8", newline="")
    return _stdout_sink()


@contextlib.contextmanager
def _stdout_sink():
    """Standard output as the sink, flushed before the command ends (so a full disk is reported as one)."""
    from numclip_cli.atomic import naming_full_disk

    with naming_full_disk("standard output"):
        yield sys.stdout
        sys.stdout.flush()


def _run(session, calibration, paths, fmt, output, resume_at, batch_size, workers, reporter, fast=False, crops=None,
         precision=None):
    """Stream records into their sink (see ``_sink``); an interrupt keeps every complete record and is returned."""
    from numclip_cli.cli.table import writer_for
    from numclip_cli.decoding import worker_died
    from numclip_cli.errors import one_line
    from numclip_cli.predictor import Predictor

    temperature, conformal = calibration
    predictor = Predictor(session.model, next(session.model.parameters()).device, temperature, conformal, fast,
                          warn=reporter.warn, precision=precision)
    ok = failed = 0
    stopped: BaseException | None = None
    # the stop handler spans the commit too: a signal then waits until the file is complete
    sink = _sink(output, resume_at)
    with stop_at_safe_points(reporter.quiet) as stop, sink as stream, reporter.progress() as progress:
        writer = writer_for(fmt, stream, session.task.bin_names, session.task.unit)
        bar = progress.add_task("predict", total=len(paths), status="")
        try:
            # one group per input: a single record, or one per face with --faces all
            for group in predictor.input_records(paths, session.transform, batch_size, workers, crops):
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
            stopped = RuntimeError(one_line(exc, limit=None))
        stopped = stop.exception() or stopped
        progress.stop()  # erase the bar before a table is printed to the same terminal
        if stopped is not None:  # keep the complete records: the sink is committed below
            reporter.warn(f"stopped after {ok + failed} of {len(paths)} input(s); "
                          f"rerun with --skip-existing to continue" if output else "stopped")
        writer.close()
    return (ok, failed), stopped
