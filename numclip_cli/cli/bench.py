"""``numclip bench``: predict's speed against the raw open_clip backbone (one run), and the methods' accuracy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from numclip_cli.cli.common import (
    BatchSizeOpt,
    CheckpointOpt,
    DeviceOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    Reporter,
    VerboseOpt,
    announce_device,
    handle_errors,
    prepare,
)

SUITES = ("speed", "accuracy", "all")


@handle_errors
def bench(
    suite: Annotated[str, typer.Option("--suite", help="speed, accuracy or all.")] = "speed",
    model: Annotated[str, typer.Option(
        "--model", help="open_clip architecture for the speed suite (ViT-B-16, numclip-tiny, ...).")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(
        "--pretrained", help="Weights for the speed suite; 'none' (random init) needs no download and runs at the "
                             "same speed.")] = "none",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 32,
    precision: PrecisionOpt = None,
    images: Annotated[int | None, typer.Option(
        "--images", min=1, help="Images per throughput measurement (default 64; 16 with --quick).",
        show_default=False)] = None,
    latency_images: Annotated[int | None, typer.Option(
        "--latency-images", min=1, help="Images per batch-1 measurement (default 8; 2 with --quick).",
        show_default=False)] = None,
    ranks: Annotated[int, typer.Option(
        "--ranks", min=2, help="M, rank prompts of the OrdinalCLIP-style reference (101 = the age task's).")] = 101,
    repeats: Annotated[int | None, typer.Option(
        "--repeats", min=1, help="Timed runs per figure, median reported (default 3; 1 with --quick).",
        show_default=False)] = None,
    fast: Annotated[bool, typer.Option(
        "--fast/--no-fast", help="Also measure predict --fast (CPU) and its same-bin agreement with fp32.")] = True,
    stream: Annotated[int, typer.Option(
        "--stream", min=0, help="Stream N images through predict and report the RSS growth (0: skip).")] = 0,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the report (device, versions, every figure with its unit) as JSON.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smoke run: fewer images, repeats and epochs; too small to judge targets or rank "
                        "methods.")] = False,
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print the tables as GitHub markdown (as in the README), not terminal tables.")] = False,
    kinds: Annotated[str | None, typer.Option(
        "--kinds", help="Accuracy suite: comma-separated synthetic generators (default dots,fill).",
        show_default=False)] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Accuracy suite: comma-separated methods (default every method).",
        show_default=False)] = None,
    n_train: Annotated[int | None, typer.Option(
        "--n-train", min=1, help="Accuracy suite: training images per generator (default 300; 120 with --quick).",
        show_default=False)] = None,
    n_test: Annotated[int | None, typer.Option(
        "--n-test", min=1, help="Accuracy suite: test images per generator (default 200; 60 with --quick).",
        show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, help="Accuracy suite: epochs per method (default 6; 1 with --quick).",
        show_default=False)] = None,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Accuracy suite: comma-separated seeds of data, initialisation and training; tables show "
                        "mean ± std over them (default 0,1,2; 0 with --quick).", show_default=False)] = None,
    shots: Annotated[str | None, typer.Option(
        "--shots", help="Accuracy suite: few-shot curve, comma-separated K (images per rank), e.g. 1,2,4,8,16.",
        show_default=False)] = None,
    shots_only: Annotated[bool, typer.Option(
        "--shots-only", help="Accuracy suite: with --shots, skip the runs on the whole training set.")] = False,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure predict against raw open_clip on this machine (e.g. `numclip bench --model numclip-tiny --quick`)."""
    prepare(offline, verbose)
    from numclip_cli.bench.accuracy import AccuracyConfig, run_accuracy_suite
    from numclip_cli.bench.report import build_report
    from numclip_cli.bench.speed import SpeedConfig, run_speed_suite
    from numclip_cli.errors import UsageError

    if suite not in SUITES:
        raise UsageError(f"--suite {suite!r}: choose one of {', '.join(SUITES)}")
    # both suites' options are checked before either suite starts its work
    speed = SpeedConfig.create(
        quick, model=model, pretrained=pretrained, checkpoint=str(checkpoint) if checkpoint else None,
        batch_size=batch_size, images=images, latency_images=latency_images, ranks=ranks, repeats=repeats,
        fast=fast, stream=stream) if suite in ("speed", "all") else None
    accuracy = AccuracyConfig.create(
        quick, kinds=_names(kinds) if kinds else None, methods=_names(methods) if methods else None,
        n_train=n_train, n_test=n_test, epochs=epochs, seeds=_ints("--seeds", seeds),
        shots=_ints("--shots", shots), shots_only=shots_only or None) if suite in ("accuracy", "all") else None
    if json_out:  # a bench runs for minutes: its report must have somewhere to go, and not over its checkpoint
        from numclip_cli.atomic import check_writable_targets
        from numclip_cli.locking import refuse_inputs_as_outputs

        check_writable_targets(("--json", json_out))
        refuse_inputs_as_outputs([("--json", json_out)], [("--checkpoint", checkpoint)])
    reporter = Reporter(quiet, verbose)
    dev = announce_device(device, reporter)
    from numclip_cli.precision import resolve_precision

    precision = resolve_precision(precision, dev).name  # a bad --precision fails before any measurement

    def say(message: str) -> None:
        reporter.info(f"bench: {message}")

    config: dict[str, Any] = {"suite": suite, "quick": quick}
    speed_result = rows = None
    if speed:
        speed = dataclasses.replace(speed, precision=precision)
        if speed.pretrained == "none" and not speed.checkpoint:
            reporter.warn(f"--pretrained none: {speed.model} is randomly initialised (speed is the same; "
                          f"the --fast agreement is measured on random features)")
        config["speed"] = vars(speed)
        speed_result = run_speed_suite(speed, dev, say)
    if accuracy:
        config["accuracy"] = vars(accuracy)

        def row_done(row: dict[str, Any]) -> None:
            shots = f", {row['shots']} per rank" if row["shots"] else ""
            say(f"accuracy: {row['kind']} {row['method']} (seed {row['seed']}{shots}): MAE {row['mae']:.3f} "
                f"({row['seconds']:.1f} s)")

        rows = run_accuracy_suite(accuracy, dev, on_progress=row_done)
    report = build_report(dev, config, speed_result, rows, smoke=quick)
    if markdown:
        from numclip_cli.bench.report import markdown as report_markdown

        print(report_markdown(report))
    else:
        _print_tables(report)
    if json_out:
        from numclip_cli.atomic import atomic_open

        with atomic_open(json_out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        reporter.info(f"bench: wrote {json_out}")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _ints(option: str, text: str | None) -> list[int] | None:
    """A comma-separated list of integers (None when the option is not given)."""
    if text is None:
        return None
    from numclip_cli.errors import UsageError

    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated integers, e.g. 1,2,4") from None


def _print_tables(report: dict[str, Any]) -> None:
    """The figures (and accuracy rows) as rich tables on stdout; a smoke run says so in each title."""
    from rich.console import Console
    from rich.table import Table

    from numclip_cli.bench.report import target_cell

    console = Console()
    env = report["environment"]
    title = (f"numclip {env['numclip']} · torch {env['torch']} · open_clip {env['open_clip']} · "
             f"{env['device']} ({env['device_name']}, {env['cpu_count']} CPUs)")
    smoke = f" · {report['smoke_run']}" if report["smoke_run"] else ""
    if report["figures"]:
        model = report["model"]
        table = Table("figure", "value", "unit", "batch", "images", "target",
                      title=f"{model['backbone']} ({model['pretrained']}, {model['method']}) · {title}{smoke}",
                      caption=report["targets_note"])
        for fig in report["figures"]:
            table.add_row(fig["label"], f"{fig['value']:.4g}", fig["unit"], _blank(fig["batch_size"]),
                          _blank(fig["images"]), target_cell(fig))
        console.print(table)
    if report["accuracy"]:
        columns = list(report["accuracy"][0])
        table = Table(*columns, title=f"accuracy on the synthetic suites{smoke}")
        for row in report["accuracy"]:
            table.add_row(*(_cell(row[column]) for column in columns))
        console.print(table)
        summary = Table("kind", "method", "shots", "seeds", "mae", "accuracy", "qwk",
                        title=f"mean ± std over seeds{smoke}")
        for row in report["accuracy_summary"]:
            summary.add_row(row["kind"], row["method"], _blank(row["shots"]), str(row["seeds"]),
                            *(_spread(row, name) for name in ("mae", "accuracy", "qwk")))
        console.print(summary)


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def _spread(row: dict[str, Any], name: str) -> str:
    return "–" if row[name] is None else f"{row[name]:.3f} ± {row[name + '_std']:.3f}"


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
