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
    CheckpointOpt,
    DeviceOpt,
    ModelOpt,
    OfflineOpt,
    PretrainedOpt,
    QuietOpt,
    Reporter,
    TaskOpt,
    Terminated,
    VerboseOpt,
    announce_device,
    handle_errors,
    prepare,
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
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, help="Decoding processes (default: 0 for a few images, else up to 4).")] = None,
    fast: Annotated[bool, typer.Option(
        "--fast", help="CPU: int8 dynamic quantisation of the image tower (see `numclip bench` for its speed-up "
                       "and same-bin agreement on your machine).")] = False,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="I/N: process every N-th input starting at I (N shards cover the input once).")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-directories.")] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated.")] = False,
    coverage: Annotated[float | None, typer.Option(
        "--coverage", help="With a calibrated checkpoint: add a prediction interval and a contiguous bin set "
                           "that hold the truth with this probability (e.g. 0.9).", show_default=False)] = None,
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
    reporter = Reporter(quiet, verbose)
    dev = announce_device(device, reporter)
    from numclip_cli.session import open_session

    session = open_session(dev, checkpoint=str(checkpoint) if checkpoint else None, model=model,
                           pretrained=pretrained, task=task)
    for message in session.warnings:
        reporter.warn(message)
    calibration = prediction_settings(session.checkpoint.calibration if session.checkpoint else None, coverage,
                                      str(checkpoint))
    counts, stopped = _run(session, calibration, all_paths, fmt, output, skip_existing, batch_size, workers,
                           reporter, fast)
    if stopped is not None:
        raise typer.Exit(EXIT_SIGINT if isinstance(stopped, KeyboardInterrupt) else EXIT_SIGTERM)
    ok, failed = counts
    if ok == 0 and failed == 0:
        reporter.info("nothing to do: every input is already in the output")
        raise typer.Exit(EXIT_OK)
    if failed:
        reporter.warn(f"{failed} of {ok + failed} input(s) could not be used (see their error records)")
    raise typer.Exit(EXIT_FAILED if ok == 0 else EXIT_PARTIAL if failed else EXIT_OK)


def _default_format(output: Path | None) -> str:
    if output is not None:
        return "csv" if output.suffix.lower() == ".csv" else "jsonl"
    return "table" if sys.stdout.isatty() else "jsonl"


def _run(session, calibration, paths, fmt, output, skip_existing, batch_size, workers, reporter, fast=False):
    """Stream records into the chosen sink; an interrupt keeps every complete record and is returned."""
    import contextlib

    from numclip_cli.atomic import atomic_open
    from numclip_cli.predictor import Predictor
    from numclip_cli.writers import done_paths, make_writer

    if skip_existing and output.exists():
        done, good_bytes = done_paths(output)
        paths = [p for p in paths if p not in done]
        with output.open("r+b") as handle:
            handle.truncate(good_bytes)
        sink = output.open("a", encoding="utf-8", newline="")
    elif output is not None:
        sink = atomic_open(output, "w", encoding="utf-8", newline="")
    else:
        sink = contextlib.nullcontext(sys.stdout)

    temperature, conformal = calibration
    predictor = Predictor(session.model, next(session.model.parameters()).device, temperature, conformal, fast)
    ok = failed = 0
    stopped: BaseException | None = None
    with sink as stream, reporter.progress() as progress:
        writer = make_writer(fmt, stream, session.task.bin_names, session.task.unit)
        bar = progress.add_task("predict", total=len(paths), status="")
        try:
            for record in predictor.records(paths, session.backbone.preprocess, batch_size, workers):
                writer.write(record)
                if record["status"] == "ok":
                    ok += 1
                else:
                    failed += 1
                progress.update(bar, advance=1, status=f"{failed} failed" if failed else "")
                if (ok + failed) % batch_size == 0:
                    writer.flush()
        except (KeyboardInterrupt, Terminated) as exc:
            stopped = exc  # keep the complete records: the sink is committed below
            reporter.warn(f"stopped after {ok + failed} of {len(paths)} input(s); "
                          f"rerun with --skip-existing to continue" if output else "stopped")
        writer.close()
    return (ok, failed), stopped
