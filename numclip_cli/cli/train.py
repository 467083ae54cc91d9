"""``numclip train``: fit a method on a labelled dataset and write best/last safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from numclip_cli.cli.common import (
    DeviceOpt,
    ModelOpt,
    OfflineOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    Reporter,
    TaskOpt,
    VerboseOpt,
    announce_device,
    handle_errors,
    prepare,
)

CacheDirOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Where image features of a frozen image tower are cached between runs (default: the user "
                        "cache folder, ~/.cache/numclip/features on Linux).", show_default=False)]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the feature cache.")]


@handle_errors
def train(
    data: Annotated[Path, typer.Option("--data", help="Folder per label, CSV/TSV (path,label) or a "
                                       "'<path> <label>' list.", show_default=False)],
    task: TaskOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    method: Annotated[str, typer.Option("--method", help="numclip (coarse-to-fine), l2rclip, ordinalclip, coop or "
                                        "linear-probe (zeroshot needs no training).")] = "numclip",
    val: Annotated[Path | None, typer.Option("--val", help="Validation data (same formats as --data).")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Held-out share of --data when --val is not "
                                             "given (seeded).")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training data.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of prompts, adapter and fine head.")] = 1e-5,
    image_lr: Annotated[float, typer.Option("--image-lr", help="Learning rate of the image tower.")] = 1e-5,
    tune_image: Annotated[bool, typer.Option("--tune-image/--freeze-image",
                                             help="Fine-tune the image tower (the reference does).")] = True,
    tune_context: Annotated[bool | None, typer.Option(
        "--tune-context/--freeze-context", help="Train the shared prompt context too (default: on for coop, "
        "ordinalclip and l2rclip, off for numclip).", show_default=False)] = None,
    milestones: Annotated[str, typer.Option("--milestones", help="Epochs where the LR drops ×0.1, "
                                            "comma-separated.")] = "60",
    seed: Annotated[int, typer.Option("--seed", help="Seed for init, data order, augmentation and split.")] = 0,
    precision: PrecisionOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image decoding processes.")] = 2,
    out: Annotated[Path, typer.Option("--out", help="Best checkpoint (the resumable last one is written "
                                      "beside it as *.last.safetensors).")] = Path("numclip.safetensors"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run that wrote --out.")] = False,
    metrics_out: Annotated[Path | None, typer.Option("--metrics-out", help="Write final metrics as JSON.")] = None,
    faces: Annotated[str | None, typer.Option(
        "--faces", help="largest: train on the largest face of each image (the whole image when none is found); "
                        "none: whole images (default: the task's, largest for age; needs numclip\\[face]). "
                        "Stored in the checkpoint, so predict crops the same way.", show_default=False)] = None,
    face_margin: Annotated[float, typer.Option(
        "--face-margin", min=0.0, help="Added on every side of a face, as a share of its size.")] = 0.4,
    device: DeviceOpt = "auto",
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train on labelled images (e.g. `numclip train --data ./hci --task hci`)."""
    prepare(offline, verbose)
    import dataclasses

    from numclip_cli.atomic import atomic_write_bytes
    from numclip_cli.backbone import DEFAULT_MODEL
    from numclip_cli.datasets import load_samples, split_validation
    from numclip_cli.distributed import init_world, launched_by_torchrun
    from numclip_cli.errors import UsageError
    from numclip_cli.faces import ONE_VIEW_MODES, resolve_mode
    from numclip_cli.session import default_pretrained
    from numclip_cli.tasks import get_task
    from numclip_cli.trainer import TrainConfig, Trainer, last_path

    # under torchrun every process runs this command; rank 0 alone talks to the user and writes files
    world = init_world("cuda" if device.startswith("cuda") or (device == "auto" and _has_cuda()) else "cpu")
    reporter = Reporter(quiet or not world.is_main, verbose)
    spec = get_task(task or _task_beside(data))
    face_mode, face_warning = resolve_mode(faces, spec.faces, ONE_VIEW_MODES)
    if face_warning:
        reporter.warn(face_warning)
    spec = dataclasses.replace(spec, faces=face_mode)  # the checkpoint's task says how its images were cropped
    samples = load_samples(data, spec)
    train_set, val_set = (samples, load_samples(val, spec)) if val else split_validation(samples, val_split, seed)
    try:
        steps = tuple(int(m) for m in milestones.split(",") if m.strip())
    except ValueError:
        raise UsageError(f"--milestones {milestones!r}: expected comma-separated epochs") from None
    config = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, lr=lr, image_lr=image_lr,
                         tune_image=tune_image, tune_context=tune_context, milestones=steps, seed=seed,
                         precision=precision, workers=workers, face_margin=face_margin)
    dev = announce_device(device, reporter)
    from numclip_cli.precision import resolve_precision

    resolve_precision(precision, dev)  # a bad --precision fails before the backbone loads
    if dev.type == "cuda" and launched_by_torchrun():
        import torch

        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)  # nccl's collectives and barriers run on the current device
    if world.distributed:
        reporter.info(f"distributed: {world.size} processes, global batch {batch_size}")
    from numclip_cli.backbone import load_backbone

    name = model or DEFAULT_MODEL
    tag = pretrained or default_pretrained(name)
    if tag == "none":
        reporter.warn(f"--pretrained none: training {name} from random initialisation")
    trainer = Trainer(load_backbone(name, tag, device=dev, init_seed=seed), spec, config, dev, world,
                      cache_dir=feature_cache_dir(cache_dir, no_cache))
    if resume:
        done = trainer.resume_from(last_path(out))
        reporter.info(f"resuming after epoch {done} of {epochs}")
    reporter.info(f"training {method} on {len(train_set)} images, validating on {len(val_set)}")
    with reporter.progress() as progress:
        bar = progress.add_task("epoch", total=None, status="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(bar, completed=step, total=total, status=f"loss {loss:.3f}")

        def on_epoch(report) -> None:
            progress.update(bar, description=f"epoch {report.epoch + 1}/{epochs}", completed=0)
            extra = f", {report.skipped} unreadable image(s) skipped" if report.skipped else ""
            reporter.info(f"epoch {report.epoch}/{epochs}: loss {report.train_loss:.4f}, val MAE "
                          f"{report.val['mae']:.4f}, acc {report.val.get('accuracy', float('nan')):.3f} "
                          f"({report.seconds:.1f} s{extra})")

        progress.update(bar, description=f"epoch {trainer.start_epoch + 1}/{epochs}")
        result = trainer.fit(train_set, val_set, out, on_step=on_step, on_epoch=on_epoch)
    if trainer.disk_cache is not None:
        reporter.info(cache_summary(trainer.disk_cache))
    summary = {"best_epoch": result.best_epoch, "val": result.best, "baseline_median_mae": result.baseline_mae,
               "checkpoint": str(out), "last": str(last_path(out)), "n_train": len(train_set), "n_val": len(val_set)}
    if not world.is_main:
        return
    if metrics_out:
        atomic_write_bytes(metrics_out, (json.dumps(summary, indent=2) + "\n").encode())
    _print_table(summary)


def feature_cache_dir(cache_dir: Path | None, no_cache: bool) -> Path | None:
    """``--cache-dir`` / ``--no-cache`` → the feature cache's root folder (None: no cache)."""
    from numclip_cli.feature_cache import default_cache_dir

    return None if no_cache else cache_dir or default_cache_dir()


def cache_summary(cache) -> str:
    """One line on what the feature cache did this run."""
    damaged = f", {cache.rejected} damaged entr(ies) rebuilt" if cache.rejected else ""
    off = " (cannot write there: not stored)" if not cache.writable else ""
    return (f"feature cache {cache.folder}: {cache.hits} image(s) read, {cache.stored} encoded and stored"
            f"{damaged}{off}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _task_beside(data: Path) -> str:
    """A dataset folder made by ``numclip synth`` carries its task.toml; anything else needs --task."""
    from numclip_cli.errors import DataError, UsageError

    if not data.exists():
        raise DataError(f"dataset not found: {data}")
    spec = data / "task.toml"
    if data.is_dir() and spec.is_file():
        return str(spec)
    raise UsageError("give --task (age, hci, aesthetics or a .toml/.json spec)")


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", title=f"best epoch {summary['best_epoch']} → {summary['checkpoint']}")
    for key, value in summary["val"].items():
        table.add_row(f"val {key}", f"{value:.4f}")
    table.add_row("predict-the-median MAE", f"{summary['baseline_median_mae']:.4f}")
    Console().print(table)
