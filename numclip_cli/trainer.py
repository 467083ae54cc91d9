"""Training loop: RAdam + MultiStep (the NumCLIP recipe), per-epoch validation, atomic best/last checkpoints,
and exact ``--resume``.

Determinism: every epoch reseeds torch/python/numpy from ``(seed, epoch)`` and draws its data order and
worker seeds from a generator seeded the same way, so a run resumed after epoch k replays epochs k+1… exactly
as an uninterrupted run; the last checkpoint carries the optimizer and scheduler state.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from numclip_cli import __version__, metrics
from numclip_cli.backbone import Backbone
from numclip_cli.checkpoint import (
    Checkpoint,
    jsonable,
    load_state,
    model_tensors,
    optimizer_state,
    optimizer_tensors,
    read_checkpoint,
    round_frozen_init,
    write_checkpoint,
)
from numclip_cli.datasets import LabelledImages, Samples, collate_labelled, derived_seed, train_transform
from numclip_cli.distributed import EpochOrder, World, barrier, gather, mean_across
from numclip_cli.errors import CheckpointError, NumclipError, UsageError, one_line
from numclip_cli.faces import DEFAULT_MARGIN, face_transform
from numclip_cli.feature_cache import FeatureCache, image_features
from numclip_cli.model.methods import OrdinalModel, create_model
from numclip_cli.precision import Precision, full_precision, resolve_precision
from numclip_cli.preprocessing import Preprocessing
from numclip_cli.tasks import SELECT_METRICS, TaskSpec


@dataclass
class TrainConfig:
    """Everything that shapes a training run (stored in the checkpoint's ``train`` metadata)."""

    method: str = "numclip"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5  # prompt words and context (the reference uses 1e-5 everywhere)
    image_lr: float = 1e-5  # image tower, when tuned
    head_lr: float | None = None  # the fine head / classifier ("head" group); None: lr × the method's head_lr_scale
    tune_image: bool = True
    # None: the method's default (trained for coop/ordinalclip/l2rclip; for numclip the task's ``tune_context``,
    # as the reference freezes it for age/decades and trains it for aesthetics)
    tune_context: bool | None = None
    milestones: tuple[int, ...] = (60,)  # MultiStep ×0.1, as the reference
    seed: int = 0
    precision: str | None = None  # --precision (numclip_cli.precision); None: amp on CUDA, fp32 elsewhere
    workers: int = 2
    face_margin: float = DEFAULT_MARGIN  # around the face crop, when the task's ``faces`` is "largest"


@dataclass
class EpochReport:
    """What one epoch measured."""

    epoch: int
    train_loss: float
    val: dict[str, float]
    skipped: int
    seconds: float


@dataclass
class TrainResult:
    """The outcome of a run."""

    best_epoch: int
    best: dict[str, float]
    history: list[EpochReport] = field(default_factory=list)
    baseline_mae: float = math.nan


_DIVERGED_HINT = "a smaller --lr or --image-lr may help"


class Diverged(NumclipError):
    """The training loss stopped being a finite number (raised before that step changes any weight)."""


def last_path(out: Path) -> Path:
    """Where the resumable ``last`` checkpoint lives beside the ``best`` one."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".last.safetensors")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_features(model: OrdinalModel, batch: dict[str, torch.Tensor], precision: Precision) -> torch.Tensor:
    """Image features of a batch: cached ones (frozen image tower), or the image tower run on its images under
    ``precision`` (float32 out: the heads compute in float32)."""
    if "features" in batch:
        return batch["features"]
    with precision.autocast():
        return model.encode_images(batch["images"]).float()


class GlobalBatchStep(nn.Module):
    """A training forward pass: this rank's images (or cached features) → features gathered over all ranks with
    gradients → the method's head and losses on the global batch (see numclip_cli.distributed)."""

    def __init__(self, model: OrdinalModel, world: World, precision: Precision) -> None:
        super().__init__()
        self.model, self.world, self.precision = model, world, precision

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses by name for the global batch."""
        features = batch_features(self.model, batch, self.precision)
        with self.precision.autocast():
            text = self.model.text_features()
        values, bins = gather(batch["values"], self.world), gather(batch["bins"], self.world)
        # The heads and losses compute in float32 whatever --precision: autocast off, float32 inputs
        # (see numclip_cli.precision for why).
        with full_precision(self.precision.device_type):
            out = self.model.head(gather(features, self.world), text.float())
            return self.model.loss(out, values, bins)


class Trainer:
    """Train one method on one backbone and task; report through callbacks (the core prints nothing)."""

    def __init__(self, backbone: Backbone, task: TaskSpec, config: TrainConfig, device: torch.device,
                 world: World | None = None, cache_dir: Path | None = None) -> None:
        self.precision = resolve_precision(config.precision, device)
        config = replace(config, precision=self.precision.name)  # the checkpoint records the one used
        self.backbone, self.task, self.config, self.device = backbone, task, config, device
        self.world = world or World()
        if config.batch_size % self.world.size:
            raise UsageError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
                             f"{self.world.size} processes")
        _seed_everything(config.seed)
        self.model: OrdinalModel = create_model(config.method, backbone, task)
        if backbone.random_init:
            round_frozen_init(self.model)
        groups = self.model.trainable_groups()
        if not groups or config.epochs < 1:
            raise UsageError(f"method {config.method!r} has nothing to train" if not groups
                             else "--epochs must be at least 1")
        lrs = {"visual": config.image_lr,
               "head": config.head_lr if config.head_lr is not None else config.lr * self.model.head_lr_scale}
        tune_context = self.model.learns_context if config.tune_context is None else config.tune_context
        wanted = {name: params for name, params in groups.items()
                  if not (name == "visual" and not config.tune_image)
                  and not (name == "context" and not tune_context)}
        if not wanted:
            raise UsageError(f"method {config.method!r} has nothing left to train with --freeze-context and "
                             f"--freeze-image: train one of them (--tune-context or --tune-image)")
        self.tunes_image = "visual" in wanted
        self._feature_cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self.cache_dir = cache_dir  # on-disk features of a frozen image tower (None: this run's memory only)
        self.disk_cache: FeatureCache | None = None  # opened on first use: it hashes the image tower's weights
        for params in wanted.values():
            for p in params:
                p.requires_grad_(True)
        self.precision.cast_backbone(self.model.clip)  # bf16/fp16: frozen weights only (see numclip_cli.precision)
        step = GlobalBatchStep(self.model, self.world, self.precision)
        self.step = DistributedDataParallel(step) if self.world.distributed else step
        self.optimizer = torch.optim.RAdam(
            [{"params": params, "lr": lrs.get(name, config.lr), "name": name} for name, params in wanted.items()],
            betas=(0.9, 0.999), weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(config.milestones), gamma=0.1)
        self.scaler = self.precision.grad_scaler()
        self.start_epoch = 0
        self.best_score = math.inf  # of the task's ``select`` metric
        self.best_epoch = -1
        self.history: list[EpochReport] = []  # epochs done before a resume

    # ----------------------------------------------------------------------------------------------- data
    def _loader(self, samples: Samples, train: bool, epoch: int) -> DataLoader:
        """Training: this rank's share of a seeded per-epoch order, augmentation seeded per sample (so the
        result does not depend on worker count or process layout). Evaluation: every sample, in order."""
        seed = derived_seed(self.config.seed, epoch)
        transform = face_transform(self.task.faces, self.config.face_margin,  # predict crops the same way
                                   train_transform(self.backbone.preprocess_cfg) if train else self.backbone.preprocess)
        world = self.world if train else World()
        return DataLoader(LabelledImages(samples, self.task, transform, augment_seed=seed if train else None),
                          batch_size=self.config.batch_size // world.size,
                          sampler=EpochOrder(len(samples), seed, world, shuffle=train),
                          num_workers=self.config.workers, collate_fn=collate_labelled,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _batches(self, samples: Samples, train: bool, epoch: int) -> DataLoader | list[dict[str, torch.Tensor]]:
        """Decoded image batches, or batches of cached image features for methods with a frozen image tower."""
        if self.tunes_image:
            return self._loader(samples, train, epoch)
        cached = self._features(samples)
        world = self.world if train else World()
        order = torch.tensor(list(EpochOrder(len(cached["values"]), derived_seed(self.config.seed, epoch), world,
                                             shuffle=train)), dtype=torch.long)
        batches = [{key: value[index.to(value.device)] for key, value in cached.items() if key != "skipped"}
                   for index in order.split(self.config.batch_size // world.size)]
        if batches:
            batches[0]["skipped"] = cached["skipped"]  # counted once per pass, like the image loader does
        return batches

    def _features(self, samples: Samples) -> dict[str, torch.Tensor]:
        """Image-tower features of every readable sample, computed once per run, and with ``cache_dir`` once per
        image across runs. A frozen tower trains on the evaluation view (no random crop/flip): deterministic
        features are what can be computed once and cached (numclip_cli.feature_cache)."""
        key = tuple(samples.paths)
        if key in self._feature_cache:
            return self._feature_cache[key]
        training = self.model.training
        self.model.eval()
        transform = face_transform(self.task.faces, self.config.face_margin, self.backbone.preprocess)
        # Plain no-grad tensors even when evaluate() (inference mode) asks first: the cache may later feed the
        # autograd graph of the trained head, which inference tensors cannot.
        with torch.inference_mode(False), torch.no_grad():
            found, _ = image_features(samples.paths, transform, self._encode, self._disk_cache(),
                                      self.config.batch_size, self.config.workers)
        self.model.train(training)
        kept = sorted(found)
        values = [samples.values[i] for i in kept]
        self._feature_cache[key] = {
            "features": torch.stack([found[i] for i in kept]).to(self.device) if kept
            else torch.empty(0, device=self.device),
            "values": torch.tensor(values, dtype=torch.float32, device=self.device),
            "bins": torch.tensor([self.task.bin_index(v) for v in values], dtype=torch.long, device=self.device),
            "skipped": torch.tensor(len(samples) - len(kept))}
        return self._feature_cache[key]

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return batch_features(self.model, {"images": images.to(self.device)}, self.precision)

    def _disk_cache(self) -> FeatureCache | None:
        """The on-disk cache of this run's image tower, preprocessing, face crop and precision (None: off)."""
        if self.cache_dir is not None and self.disk_cache is None:
            self.disk_cache = FeatureCache.for_model(self.cache_dir, self.model, self.backbone.preprocess_cfg,
                                                     self.task.faces, self.config.face_margin, self.precision.name)
        return self.disk_cache

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    # ------------------------------------------------------------------------------------------- training
    def train_epoch(self, samples: Samples, epoch: int,
                    on_step: Callable[[int, int, float], None]) -> tuple[float, int]:
        """One pass over the training data; returns (mean loss, skipped images)."""
        _seed_everything(derived_seed(self.config.seed, epoch))
        self.model.train()
        if not self.tunes_image:
            self.model.clip.visual.eval()  # frozen tower: keep its norm/dropout layers in inference behaviour
        loader = self._batches(samples, train=True, epoch=epoch)
        losses, skipped = [], 0
        for step, batch in enumerate(loader):
            skipped += int(batch.get("skipped", 0))
            if "values" not in batch:
                continue
            loss = self.step(self._on_device(batch))
            value = float(loss["total"].detach())  # the global batch's loss: the same on every rank
            if not math.isfinite(value):
                raise Diverged(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss["total"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(value)
            on_step(step + 1, len(loader), value)
        self.scheduler.step()
        return (statistics.fmean(losses) if losses else math.nan), skipped

    @torch.inference_mode()
    def evaluate(self, samples: Samples) -> dict[str, float]:
        """``metrics.summarize`` on held-out data: MAE in the task unit and in levels, accuracies, CS@L, QWK."""
        self.model.eval()
        text = self.model.text_features()
        values, targets, probs, value_max = [], [], [], []
        for batch in self._batches(samples, train=False, epoch=0):
            if "values" not in batch:
                continue
            out = self.model.head(batch_features(self.model, self._on_device(batch), self.precision), text)
            values.append(out.value.float().cpu())
            probs.append(self.model.bin_logits(out.logits).float().softmax(-1).cpu())
            if out.value_max is not None:
                value_max.append(out.value_max.float().cpu())
            targets.append(batch["values"].cpu())
        if not values:
            return {name: math.nan for name in SELECT_METRICS}
        return metrics.summarize(self.task, torch.cat(values), torch.cat(targets), torch.cat(probs),
                                 value_max=torch.cat(value_max) if value_max else None)

    def fit(self, train: Samples, val: Samples, out: Path,
            on_step: Callable[[int, int, float], None] = lambda *_: None,
            on_epoch: Callable[[EpochReport], None] = lambda _: None) -> TrainResult:
        """Train for the configured epochs (from ``start_epoch`` when resumed), checkpointing every epoch."""
        if self.start_epoch == self.config.epochs and self.best_epoch >= 1 and not out.exists():
            raise CheckpointError(f"{out}: not found, and {last_path(out)} shows the run already finished its "
                                  f"{self.config.epochs} epoch(s): to train more, resume with a larger --epochs")
        baseline = metrics.mae(torch.full((len(val),), statistics.median(train.values)), torch.tensor(val.values))
        history = list(self.history)
        for epoch in range(self.start_epoch, self.config.epochs):
            started = time.perf_counter()
            try:
                loss, skipped = self.train_epoch(train, epoch, on_step)
            except Diverged as err:
                kept = (f"{out} keeps epoch {self.best_epoch}, the best so far, and {last_path(out)} epoch {epoch}"
                        if self.best_epoch >= 1 else f"{out} was not written")
                raise NumclipError(f"{err}; training stopped before that step changed the weights: {kept} "
                                   f"({_DIVERGED_HINT})") from None
            skipped = round(mean_across(skipped, self.world) * self.world.size)
            report = EpochReport(epoch + 1, loss, self.evaluate(val), skipped, time.perf_counter() - started)
            history.append(report)
            improved = report.val[self.task.select] < self.best_score  # the task's paper metric; lower is better
            if improved:
                self.best_score, self.best_epoch = report.val[self.task.select], epoch + 1
            if self.world.is_main:  # every rank holds the same weights; one writes them
                if improved:
                    self._save(out, train, val, report, history, baseline, resume=False)
                self._save(last_path(out), train, val, report, history, baseline, resume=True)
                on_epoch(report)
            barrier(self.world)
        if self.best_epoch < 1:  # only an improving epoch writes ``out``: a file there now is another run's
            last = f" (last epoch: train loss {history[-1].train_loss:.4g})" if history else ""
            raise NumclipError(f"no epoch reached a finite validation {self.task.select}{last}; {out} was not written "
                               f"({_DIVERGED_HINT})")
        best = read_checkpoint(out).train.get("metrics", {})
        return TrainResult(self.best_epoch, best, history, baseline)

    # ------------------------------------------------------------------------------------- checkpoints
    def _summary(self, train: Samples, val: Samples, report: EpochReport, baseline: float) -> dict[str, Any]:
        return {"numclip_version": __version__, "config": asdict(self.config), "epoch": report.epoch,
                "best_epoch": self.best_epoch, "select": self.task.select, "best_val": self.best_score,
                "metrics": report.val,
                "baseline_median_mae": baseline,
                "data": {"train": train.source, "val": val.source, "n_train": len(train), "n_val": len(val)}}

    def _save(self, path: Path, train: Samples, val: Samples, report: EpochReport, history: list[EpochReport],
              baseline: float, resume: bool) -> None:
        tensors = model_tensors(self.model, self.backbone, tuned_image=self.tunes_image)
        state = None
        if resume:
            optim_tensors, state = optimizer_tensors(self.optimizer.state_dict())
            tensors.update(optim_tensors)
            state.update({"epoch": report.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
                          "scheduler": jsonable(self.scheduler.state_dict()),
                          "history": [asdict(h) for h in history]})
        preprocess = Preprocessing(self.backbone.preprocess_cfg, self.task.faces, self.config.face_margin)
        write_checkpoint(path, Checkpoint(tensors=tensors, task=self.task, method=self.config.method,
                                          backbone=self.backbone.describe(),
                                          train=self._summary(train, val, report, baseline), resume=state,
                                          preprocess=preprocess.to_metadata()))

    def resume_from(self, path: Path) -> int:
        """Restore model, optimizer and scheduler from a ``last`` checkpoint; returns the epochs already done.

        The resume state is checked whole before anything is restored: damage (a wrong type, a missing key, an
        epoch count out of range, optimizer state that does not fit this model) is one ``CheckpointError``.
        """
        ckpt = read_checkpoint(path)
        if not ckpt.resume:
            raise CheckpointError(f"{path}: has no resume state (only '*.last.safetensors' files can be resumed)")
        if ckpt.method != self.config.method or ckpt.task != self.task:
            raise UsageError(f"{path}: was trained with method {ckpt.method!r} on task {ckpt.task.name!r}; "
                             f"resume with the same --method and --task")
        try:
            epoch, optimizer, scheduler, history = self._resume_state(ckpt)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"missing {exc}" if isinstance(exc, KeyError) else one_line(exc)
            raise CheckpointError(f"{path}: holds damaged resume state ({problem}): delete it or train without "
                                  f"--resume") from None
        if epoch > self.config.epochs:
            raise UsageError(f"{path}: the run already trained {epoch} epochs, more than --epochs "
                             f"{self.config.epochs}: resume with --epochs {epoch} or more")
        load_state(self.model, ckpt.model_tensors(), str(path), require_backbone=self.backbone.stored_in_checkpoint)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        self.start_epoch, self.history = epoch, history
        self.best_score, self.best_epoch = float(ckpt.resume["best_score"]), ckpt.resume["best_epoch"]
        return epoch

    def _resume_state(self, ckpt: Checkpoint) -> tuple[int, dict[str, Any], dict[str, Any], list[EpochReport]]:
        """(epochs done, optimizer state, scheduler state, history) of a ``last`` checkpoint, checked against this
        trainer's fresh optimizer and scheduler; damage is a ``ValueError`` (or ``KeyError``/``TypeError``)."""
        resume = ckpt.resume
        if not isinstance(resume, dict):
            raise ValueError(f"a {type(resume).__name__}, not a table")
        epoch = resume["epoch"]
        if not _is_count(epoch):
            raise ValueError(f"epoch {epoch!r:.40} is not a count of epochs")
        if not isinstance(resume["history"], list) or len(resume["history"]) != epoch:
            raise ValueError(f"the history does not list its {epoch} epoch(s)")
        history = [_epoch_report(entry, number) for number, entry in enumerate(resume["history"], start=1)]
        best_epoch, best_score = resume["best_epoch"], resume["best_score"]
        if type(best_epoch) is not int or not (best_epoch == -1 or 1 <= best_epoch <= epoch):
            raise ValueError(f"best_epoch {best_epoch!r:.40} is not -1 or an epoch from 1 to {epoch}")
        if not _is_number(best_score) or math.isnan(best_score):
            raise ValueError(f"best_score {best_score!r:.40} is not a number")
        optimizer = optimizer_state(ckpt.tensors, resume)
        _check_optimizer_state(optimizer, self.optimizer)
        return epoch, optimizer, _scheduler_state(resume["scheduler"], self.scheduler, epoch), history


_RADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what torch's RAdam keeps per parameter
_RADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # shaped like the parameter


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _fits(value: Any, fresh: Any, exact: bool) -> bool:
    """Whether stored JSON ``value`` can stand where a freshly built trainer has ``fresh``: a finite number ≥ 0
    for a number; for anything else the same type (a list: as long, item by item), or with ``exact`` the same
    value."""
    if _is_number(fresh):
        return _is_number(value) and math.isfinite(value) and value >= 0
    if exact:
        return value == fresh
    if isinstance(fresh, list):
        return isinstance(value, list) and len(value) == len(fresh) and all(
            _fits(v, f, exact) for v, f in zip(value, fresh, strict=True))
    return type(value) is type(fresh)


def _epoch_report(entry: Any, epoch: int) -> EpochReport:
    """One stored ``history`` entry: epoch ``epoch``'s report."""
    if (not isinstance(entry, dict) or set(entry) != set(EpochReport.__dataclass_fields__)
            or type(entry["epoch"]) is not int or entry["epoch"] != epoch or not _is_count(entry["skipped"])
            or not all(_is_number(entry[key]) for key in ("train_loss", "seconds"))
            or not isinstance(entry["val"], dict) or not all(_is_number(v) for v in entry["val"].values())):
        raise ValueError(f"history entry {entry!r:.80} is not the report of epoch {epoch}")
    return EpochReport(**entry)


def _check_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """``ValueError`` unless ``state`` fits ``optimizer``: the same parameter groups (with finite, non-negative
    hyperparameters) and RAdam's per-parameter state shaped like each parameter."""
    groups, fresh = state["param_groups"], jsonable(optimizer.state_dict()["param_groups"])
    # a key this torch has and the file lacks (written by an older torch) keeps the optimizer's default
    if not (isinstance(groups, list) and len(groups) == len(fresh) and all(
            isinstance(group, dict) and {"params", "lr"} <= set(group)
            and all(_fits(group[key], value, exact=True) for key, value in own.items() if key in group)
            for group, own in zip(groups, fresh, strict=True))):
        raise ValueError(f"the optimizer's parameter groups do not match this run's {[g['name'] for g in fresh]}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["state"].items():
        if index >= len(params) or set(entries) != _RADAM_STATE:
            raise ValueError(f"optimizer state {sorted(entries)} for parameter {index} does not fit this run's "
                             f"{len(params)} parameters")
        step = entries["step"]
        if not (_is_number(step) or isinstance(step, torch.Tensor) and step.numel() == 1):
            raise ValueError(f"optimizer step of parameter {index} is not a number")
        for key in _RADAM_MOMENTS:
            value = entries[key]
            if not isinstance(value, torch.Tensor) or value.shape != params[index].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"optimizer {key} of parameter {index} is {shape}, the parameter is "
                                 f"{tuple(params[index].shape)}")


def _scheduler_state(raw: Any, scheduler: torch.optim.lr_scheduler.MultiStepLR, epoch: int) -> dict[str, Any]:
    """The stored scheduler state, checked against a fresh ``scheduler``'s fields, with its milestones back as
    the ``Counter`` MultiStepLR keeps (JSON has only string keys)."""
    fresh = jsonable(scheduler.state_dict())
    # only the fields this torch's scheduler has are restored (load_state_dict would set any other as an attribute,
    # e.g. over its step method); one this torch has and the file lacks (an older torch) keeps its fresh value
    if not isinstance(raw, dict) or not {"milestones", "last_epoch"} <= set(raw) or not all(
            _fits(raw[key], value, exact=False) for key, value in fresh.items() if key in raw):
        raise ValueError(f"the scheduler state lacks or mistypes one of {sorted(fresh)}")
    raw = {key: raw[key] for key in fresh if key in raw}
    if raw["last_epoch"] != epoch:
        raise ValueError(f"the scheduler stopped at epoch {raw['last_epoch']}, not {epoch}")
    milestones = raw["milestones"]
    if not all(key.isdecimal() and len(key) < 10 and _is_count(count) for key, count in milestones.items()):
        raise ValueError("the scheduler's milestones are not epochs with counts")
    return {**raw, "milestones": Counter({int(key): count for key, count in milestones.items()})}
