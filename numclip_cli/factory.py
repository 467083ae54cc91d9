"""The one way to build a model: ``create_model_and_transforms`` returns a ready model with the preprocessing it
expects, from a numclip checkpoint or from a named open_clip backbone with a method and a task (the shape of
open_clip's function of the same name). ``train`` uses its backbone half, ``open_backbone``.

What checkpoint metadata may make numclip build (see docs/weights.md): an open_clip architecture with one of its
known pretrained tags, or an architecture (by name or by an inline config) whose every tensor the checkpoint
carries, checked by shape before anything is allocated. Device choice lives here too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from numclip_cli.backbone import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    HF_HUB_PREFIX,
    LOCAL_DIR_PREFIX,
    NO_WEIGHTS,
    STORED_WEIGHTS,
    Backbone,
    inline_backbone,
    is_known_model,
    load_backbone,
)
from numclip_cli.checkpoint import BACKBONE_PREFIX, Checkpoint, load_state, read_checkpoint
from numclip_cli.errors import CheckpointError, UsageError, WeightsError
from numclip_cli.faces import DEFAULT_MARGIN
from numclip_cli.inline_config import check_inline_config
from numclip_cli.model.methods import OrdinalModel, create_model
from numclip_cli.preprocessing import Preprocessing
from numclip_cli.tasks import TaskSpec, get_task

#: checkpoints that ship with numclip, by the short name ``--checkpoint`` accepts from any directory
SHIPPED_CHECKPOINTS = ("numclip-tiny-dots",)
WEIGHTS_ENV = "NUMCLIP_WEIGHTS"  # a folder holding the shipped ``<name>.safetensors`` files (e.g. a wheel install)


@dataclass
class LoadedModel:
    """A model in eval mode on its device, its backbone and task, and the preprocessing it expects."""

    model: OrdinalModel
    backbone: Backbone
    task: TaskSpec
    preprocess: Preprocessing
    checkpoint: Checkpoint | None = None  # when loaded from a file
    warnings: list[str] = field(default_factory=list)  # for the user, e.g. "random init"
    transform: Callable = field(init=False)  # PIL image → tensor, built from ``preprocess``

    def __post_init__(self) -> None:
        self.transform = self.preprocess.transform()


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``; usage error when unavailable.

    Under torchrun, ``auto``/``cuda`` on a CUDA machine means this process's own GPU (``LOCAL_RANK``).
    """
    from numclip_cli.distributed import launched_by_torchrun

    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is None and launched_by_torchrun():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' requested but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def default_pretrained(name: str) -> str:
    """The pretrained tag used when none is given: ``openai`` where it exists, else the first known tag."""
    import open_clip

    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return DEFAULT_PRETRAINED  # ignored: a bundle brings its own weights
    tags = open_clip.list_pretrained_tags_by_model(name) if is_known_model(name) else []
    if DEFAULT_PRETRAINED in tags:
        return DEFAULT_PRETRAINED
    return tags[0] if tags else NO_WEIGHTS


def open_backbone(model: str | None = None, pretrained: str | None = None, device: Any = "cpu",
                  init_seed: int = 0, for_training: bool = False) -> tuple[Backbone, list[str]]:
    """The backbone the user's ``--model``/``--pretrained`` name (defaults: ViT-B-16, its ``openai`` weights),
    and what to tell them about it. ``for_training`` first checks that a checkpoint can record it."""
    name = model or DEFAULT_MODEL
    tag = pretrained or default_pretrained(name)
    notes = []
    if tag.lower() == NO_WEIGHTS:
        notes.append(f"--pretrained none: {name} is randomly initialised" if pretrained else
                     f"{name} has no pretrained weights: it is randomly initialised")
    backbone = load_backbone(name, tag, device=device, init_seed=init_seed)
    if for_training:
        try:
            _builder(backbone.describe(), f"--model {name}")
        except CheckpointError as exc:
            raise UsageError(f"cannot train on this backbone: a numclip checkpoint could not record it "
                             f"({exc})") from None
    return backbone, notes


def create_model_and_transforms(device: Any = "cpu", checkpoint: str | Path | None = None, model: str | None = None,
                                pretrained: str | None = None, task: str | TaskSpec | None = None,
                                method: str = "zeroshot") -> LoadedModel:
    """Load a checkpoint (which carries its task, backbone and preprocessing), or build ``method`` for ``task``
    on the backbone ``model``/``pretrained`` name. The model is in eval mode on ``device``."""
    if checkpoint is not None:
        if model or pretrained:
            raise UsageError("--checkpoint carries its own backbone: do not combine it with --model/--pretrained")
        loaded = _from_checkpoint(resolve_checkpoint(checkpoint), device)
        if task is not None:
            wanted = task if isinstance(task, TaskSpec) else loaded.task if task == loaded.task.name else get_task(task)
            if wanted != loaded.task:
                raise UsageError(f"--task {wanted.name!r} does not match the checkpoint's task {loaded.task.name!r}; "
                                 f"drop --task (the checkpoint carries it)")
        return loaded
    if task is None:
        raise UsageError("give --task (age, hci, aesthetics or a .toml/.json spec) or --checkpoint FILE")
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    backbone, notes = open_backbone(model, pretrained, device)
    warnings = [f"{note}; predictions are meaningless until it is trained" for note in notes]
    preprocess = Preprocessing(image=backbone.preprocess_cfg, faces=spec.faces, face_margin=DEFAULT_MARGIN)
    return LoadedModel(create_model(method, backbone, spec).eval(), backbone, spec, preprocess, None, warnings)


def resolve_checkpoint(value: str | Path) -> Path:
    """The file ``--checkpoint`` means: a shipped checkpoint's short name (exactly one of
    ``SHIPPED_CHECKPOINTS``; a name is never joined into an arbitrary path), else the path as given."""
    text = str(value)
    if text not in SHIPPED_CHECKPOINTS:
        if not Path(text).exists() and Path(text).name == text and not Path(text).suffix:
            raise CheckpointError(f"checkpoint not found: {text} (a file path, or a shipped checkpoint: "
                                  f"{', '.join(SHIPPED_CHECKPOINTS)})")
        return Path(value)
    folders = weights_folders()
    for folder in folders:
        if (folder / f"{text}.safetensors").is_file():
            return folder / f"{text}.safetensors"
    raise CheckpointError(f"shipped checkpoint {text} is not installed (looked in {', '.join(map(str, folders))}); "
                          f"set {WEIGHTS_ENV} to the folder holding {text}.safetensors")


def weights_folders() -> list[Path]:
    """Where shipped checkpoints are looked up, in order: ``$NUMCLIP_WEIGHTS``, then the ``weights/`` folder
    beside the package (a clone, or an editable install of it)."""
    beside_package = Path(__file__).resolve().parent.parent / "weights"
    return ([Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []) + [beside_package]


def _from_checkpoint(path: Path, device: Any) -> LoadedModel:
    ckpt = read_checkpoint(path)
    tensors = ckpt.model_tensors()  # a resumable ``last`` checkpoint also holds the optimizer state: not needed
    stored = {key: tuple(value.shape) for key, value in tensors.items()}
    backbone = checkpoint_backbone(ckpt.backbone, str(path), device, stored)
    preprocess = _preprocessing(ckpt, backbone, str(path))
    try:
        model = create_model(ckpt.method, backbone, ckpt.task)
    except UsageError as exc:  # e.g. a method this numclip does not know: the file is the problem, not the user
        raise CheckpointError(f"{path}: {exc}") from None
    load_state(model, tensors, str(path), require_backbone=backbone.stored_in_checkpoint)
    return LoadedModel(model.eval(), backbone, ckpt.task, preprocess, ckpt)


def _preprocessing(ckpt: Checkpoint, backbone: Backbone, source: str) -> Preprocessing:
    """The stored preprocessing; for checkpoints written before it was stored, what numclip did then (the
    backbone's own open_clip preprocessing, the task's face mode, the training margin)."""
    data = ckpt.preprocess
    if data is None:
        margin = ckpt.train.get("config", {}).get("face_margin", DEFAULT_MARGIN)
        data = Preprocessing(image=backbone.preprocess_cfg, faces=ckpt.task.faces, face_margin=margin).to_metadata()
    try:
        preprocess = Preprocessing.from_metadata(data)
    except ValueError as exc:
        raise CheckpointError(f"{source}: damaged metadata: {exc}") from None
    tower = Preprocessing(image=backbone.preprocess_cfg).size
    if preprocess.size != tower:
        raise CheckpointError(f"{source}: preprocessing size {list(preprocess.size)} does not match the image "
                              f"tower's input {list(tower)}")
    return preprocess


def checkpoint_backbone(info: dict[str, Any], source: str, device: Any = "cpu",
                        stored: dict[str, tuple[int, ...]] | None = None) -> Backbone:
    """The backbone checkpoint metadata describes (see ``_builder``). For one the checkpoint must carry,
    ``stored`` (tensor name → shape) is first checked against the declared architecture built on the meta
    device, so a small file declaring a huge model is refused before anything is allocated."""
    build = _builder(info, source)
    if stored is not None and info["pretrained"] in (NO_WEIGHTS, STORED_WEIGHTS):
        try:
            declared = build("meta")
        except WeightsError as exc:  # e.g. a width that its head count does not divide
            raise CheckpointError(f"{source}: backbone {info['name']!r} cannot be built from its config "
                                  f"({' '.join(str(exc.__cause__ or exc).split())[:120]})") from None
        _check_carried(declared, stored, source)
    backbone = build(device)
    return dataclasses.replace(backbone, pretrained=info["pretrained"]) if not backbone.tagged else backbone


def _builder(info: dict[str, Any], source: str) -> Callable[[Any], Backbone]:
    """How to build what metadata describes, by the only two routes it may take: an open_clip architecture
    with one of its known pretrained tags, or an architecture (by name, or an inline config) whose every
    tensor the checkpoint carries. Nothing named by metadata is ever read as a file or fetched as a repo."""
    import open_clip

    name, pretrained, cfg = info["name"], info["pretrained"], info.get("model_cfg") or {}
    known = is_known_model(name)
    if pretrained in (NO_WEIGHTS, STORED_WEIGHTS):
        if known and (not cfg or cfg == open_clip.get_model_config(name)):
            return lambda device: load_backbone(name, NO_WEIGHTS, device=device)
        try:
            check_inline_config(cfg)
        except ValueError as exc:
            raise CheckpointError(f"{source}: backbone {name!r}: {exc}") from None
        return lambda device: inline_backbone(name, cfg, device=device)
    if not known:
        raise CheckpointError(f"{source}: backbone {name!r} is not an open_clip architecture, so it has no "
                              f"pretrained tag {pretrained!r}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise CheckpointError(f"{source}: {pretrained!r} is not a pretrained tag of {name} (known: "
                              f"{', '.join(tags) or 'none'})")
    return lambda device: load_backbone(name, pretrained, device=device)


def _check_carried(declared: Backbone, stored: dict[str, tuple[int, ...]], source: str) -> None:
    """Every tensor of the declared backbone (built on the meta device) must be in the file, with its shape."""
    size = sum(value.numel() for value in declared.model.state_dict().values())
    declares = f"{source}: declares backbone {declared.name!r} ({size / 1e6:.1f} M values)"
    for key, value in declared.model.state_dict().items():
        want, got = tuple(value.shape), stored.get(BACKBONE_PREFIX + key)
        if got is None:
            raise CheckpointError(f"{declares} but does not carry its tensor {BACKBONE_PREFIX + key!r}")
        if got != want:
            raise CheckpointError(f"{declares} but its tensor {BACKBONE_PREFIX + key!r} has shape {got}, "
                                  f"not {want}")
