"""``numclip train``: fit a method on a labelled dataset and write best/last safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from numclip_cli.cli.common import (
    MAX_SEED,
    CacheDirOpt,
    DeviceOpt,
    ModelOpt,
    NoCacheOpt,
    OfflineOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    Reporter,
    TaskOpt,
    VerboseOpt,
    WorkersOpt,
    announce_device,
    cache_summary,
    feature_cache_dir,
    fraction,
    handle_errors,
    non_negative,
    positive,
    prepare,
    task_file,
)
from numclip_cli.names import METHOD_NAMES, UNTRAINED_METHODS, task_choices

TRAINABLE = [name for name in METHOD_NAMES if name not in UNTRAINED_METHODS]

# Default learning rates (prompts; image tower). From random init: what the synthetic method comparison trains
# with (chosen on development seeds, docs/methods.md §9; the shipped demo uses image lr 1e-3 for --fast's int8
# agreement); a pretrained CLIP (fine-tuned, so small steps): the NumCLIP reference's recipe.
RANDOM_INIT_LR = (3e-3, 3e-3)
PRETRAINED_LR = (1e-5, 1e-5)
AUTO_MILESTONES = (0.6, 0.85)  # shares of --epochs after which the LR drops ×0.1
FEW_VALIDATION = 20  # fewer validation images than this: accuracy and QWK move in steps of 5 % or more


def trainable_method(value: str) -> str:
    """Option callback: a method that trains, checked before the data or the backbone is opened."""
    if value in UNTRAINED_METHODS:
        raise typer.BadParameter(f"{value} has nothing to train: `numclip predict --task T` without --checkpoint "
                                 "runs it")
    if value not in METHOD_NAMES:
        raise typer.BadParameter(f"unknown method {value!r}: choose from {', '.join(TRAINABLE)}")
    return value



@handle_errors
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Folder per label, CSV/TSV (path,label) or a "
                                       "'<path> <label>' list.", show_default=False)],
    task: TaskOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    method: Annotated[str, typer.Option("--method", callback=trainable_method,
                                        help=f"{', '.join(TRAINABLE)} (numclip: coarse-to-fine; "
                                        "numclip-position: numclip 0.2's fine head; "
                                        "numclip-ssr: the same as the NumCLIP reference builds it; "
                                        f"{', '.join(UNTRAINED_METHODS)} needs no training).")] = "numclip",
    val: Annotated[Path | None, typer.Option("--val", help="Validation data (same formats as --data).")] = None,
    val_split: Annotated[float, typer.Option("--val-split", callback=fraction, help="Held-out share of --data "
                                             "when --val is not given (seeded; between 0 and 1).")] = 0.1,
    shots: Annotated[int | None, typer.Option(
        "--shots", min=1, help="Few-shot: train on K images per rank (per bin for tasks with ranks = \"bins\"), "
        "drawn at random with --seed; without --val, validation is the --val-split share of the other images.",
        show_default=False)] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training data.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")] = 32,
    lr: Annotated[float | None, typer.Option(
        "--lr", callback=positive, show_default=False, help="Learning rate of the prompts "
        f"(> 0; default: {RANDOM_INIT_LR[0]:g} from random init, else {PRETRAINED_LR[0]:g} as the NumCLIP "
        "reference).")] = None,
    image_lr: Annotated[float | None, typer.Option(
        "--image-lr", callback=positive, show_default=False, help="Learning rate of the image tower (> 0; "
        f"default: {RANDOM_INIT_LR[1]:g} from random init, else {PRETRAINED_LR[1]:g}).")] = None,
    head_lr: Annotated[float | None, typer.Option(
        "--head-lr", callback=positive, show_default=False, help="Learning rate of the fine head or classifier "
        "(> 0; default: --lr, ×30 for numclip's offset head, ×10 for numclip-position's).")] = None,
    tune_image: Annotated[bool, typer.Option("--tune-image/--freeze-image",
                                             help="Fine-tune the image tower (the reference does).")] = True,
    tune_context: Annotated[bool | None, typer.Option(
        "--tune-context/--freeze-context", help="Train the shared prompt context too (default: on for coop, "
        "ordinalclip and l2rclip; for the numclip methods the task's tune_context, on for aesthetics only).",
        show_default=False)] = None,
    milestones: Annotated[str, typer.Option("--milestones", help="Epochs after which the LR drops ×0.1, "
                                            "comma-separated; auto: after 60 % and 85 % of --epochs.")] = "auto",
    seed: Annotated[int, typer.Option(
        "--seed", min=0, max=MAX_SEED, help="Seed for init, data order, augmentation and split.")] = 0,
    precision: PrecisionOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Best checkpoint (the resumable last one is written "
                                      "beside it as *.last.safetensors).")] = Path("numclip.safetensors"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run that wrote --out.")] = False,
    metrics_out: Annotated[Path | None, typer.Option("--metrics-out", help="Write final metrics as JSON.")] = None,
    faces: Annotated[str | None, typer.Option(
        "--faces", help="largest: train on the largest face of each image (the whole image when none is found); "
                        "none: whole images (default: the task's, largest for age; needs numclip[face]). "
                        "Stored in the checkpoint, so predict crops the same way.", show_default=False)] = None,
    face_margin: Annotated[float | None, typer.Option(
        "--face-margin", callback=non_negative, show_default=False,
        help="Added on every side of a face, as a share of its size (default 0.4).")] = None,
    device: DeviceOpt = "auto",
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train on labelled images (e.g. `numclip train --data ./hci --task hci`)."""
    prepare(offline, verbose)
    import dataclasses

    from numclip_cli.atomic import atomic_write_bytes
    from numclip_cli.datasets import few_shot, load_samples, split_validation
    from numclip_cli.decoding import default_workers
    from numclip_cli.distributed import init_world, launched_by_torchrun
    from numclip_cli.errors import DataError
    from numclip_cli.faces import DEFAULT_MARGIN, ONE_VIEW_MODES, resolve_mode
    from numclip_cli.factory import open_backbone, resolve_device
    from numclip_cli.locking import claim_outputs, refuse_inputs_as_outputs
    from numclip_cli.tasks import get_task
    from numclip_cli.trainer import TrainConfig, Trainer, last_path

    # under torchrun every process runs this command; rank 0 alone talks to the user and writes files
    world = init_world(resolve_device(device).type)
    # outputs are checked, and locked by the rank that writes them, before any work, until the command ends
    outputs = [("--out", out), ("--out", last_path(out)), ("--metrics-out", metrics_out)]
    ctx.with_resource(claim_outputs(*outputs, lock=world.is_main))
    reporter = Reporter(quiet or not world.is_main, verbose)
    steps = parse_milestones(milestones, epochs)
    spec_path = task or _task_beside(data)
    spec = get_task(spec_path)
    face_mode, face_warning = resolve_mode(faces, spec.faces, ONE_VIEW_MODES)
    if face_warning:
        reporter.warn(face_warning)
    spec = dataclasses.replace(spec, faces=face_mode)  # the checkpoint's task says how its images were cropped
    samples = load_samples(data, spec)
    if shots:
        train_set, rest, short = few_shot(samples, spec, shots, seed)
        if short:
            reporter.warn(f"{len(short)} rank(s) have fewer than {shots} images (e.g. {', '.join(short[:3])}): "
                          f"all of theirs are used")
        if not rest and not val:
            raise DataError(f"--shots {shots} puts every image of {data} into training, leaving none to validate "
                            f"on: give --val DATA or a smaller --shots")
        val_set = load_samples(val, spec) if val else split_validation(rest, val_split, seed)[1]
    else:
        train_set, val_set = (samples, load_samples(val, spec)) if val else split_validation(samples, val_split, seed)
    refuse_inputs_as_outputs(outputs, [
        ("--data", data), ("--val", val), ("the task spec", task_file(spec_path)),
        *(("the image", path) for path in [*samples.paths, *val_set.paths])])
    if milestones.strip() != "auto" and min(steps) >= epochs:
        reporter.warn(f"--milestones {milestones}: the learning rate never drops in {epochs} epoch(s)")
    if len(val_set) < FEW_VALIDATION:
        reporter.warn(f"only {len(val_set)} validation image(s): their metrics (and the choice of the best epoch) "
                      f"are mostly chance; give --val DATA or a larger --val-split (at least {FEW_VALIDATION})")
    dev = announce_device(device, reporter)
    from numclip_cli.precision import resolve_precision

    resolve_precision(precision, dev)  # a bad --precision fails before the backbone loads
    if dev.type == "cuda" and launched_by_torchrun():
        import torch

        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)  # nccl's collectives and barriers run on the current device
    if world.distributed:
        reporter.info(f"distributed: {world.size} processes, global batch {batch_size}")
    backbone, notes = open_backbone(model, pretrained, dev, init_seed=seed, for_training=True)
    for note in notes:
        reporter.warn(note)
    default_lr = RANDOM_INIT_LR if backbone.random_init else PRETRAINED_LR
    config = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, lr=lr or default_lr[0],
                         image_lr=image_lr or default_lr[1], head_lr=head_lr, tune_image=tune_image,
                         tune_context=tune_context,
                         milestones=steps, seed=seed, precision=precision,
                         face_margin=DEFAULT_MARGIN if face_margin is None else face_margin,
                         workers=default_workers(len(train_set), batch_size, dev.type) if workers is None else workers)
    trainer = Trainer(backbone, spec, config, dev, world, cache_dir=feature_cache_dir(cache_dir, no_cache))
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


def parse_milestones(text: str, epochs: int) -> tuple[int, ...]:
    """``--milestones``: comma-separated epochs, or ``auto`` (after 60 % and 85 % of the epochs).

    >>> parse_milestones("auto", 10), parse_milestones("auto", 100), parse_milestones("auto", 1)
    ((6, 9), (60, 85), (1,))
    >>> parse_milestones("3, 5", 10)
    (3, 5)
    """
    from numclip_cli.errors import UsageError

    if text.strip() == "auto":
        return tuple(sorted({max(1, int(share * epochs + 0.5)) for share in AUTO_MILESTONES}))
    try:
        steps = tuple(int(m) for m in text.split(",") if m.strip())
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise UsageError(f"--milestones {text!r}: expected 'auto' or comma-separated epochs (1 or more)")
    return steps


def _task_beside(data: Path) -> str:
    """A dataset folder made by ``numclip synth`` carries its task.toml; anything else needs --task."""
    from numclip_cli.errors import DataError, UsageError

    if not data.exists():
        raise DataError(f"dataset not found: {data}")
    spec = data / "task.toml"
    if data.is_dir() and spec.is_file():
        return str(spec)
    raise UsageError(f"give --task ({task_choices()} or a .toml/.json spec)")


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", title=f"best epoch {summary['best_epoch']} → {summary['checkpoint']}")
    for key, value in summary["val"].items():
        table.add_row(f"val {key}", f"{value:.4f}")
    table.add_row("predict-the-median MAE", f"{summary['baseline_median_mae']:.4f}")
    Console().print(table)
