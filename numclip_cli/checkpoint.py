"""numclip checkpoints: one ``.safetensors`` file of trained tensors + JSON metadata; never unpickled.

Metadata keys (string → JSON string): ``numclip.format``, ``task``, ``method``, ``backbone``, ``train``, and
``calibration`` once calibrated. Backbone tensors are stored only when they cannot be rebuilt from the
backbone's name and pretrained tag (random init, or an image tower that was fine-tuned).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from numclip_cli.atomic import atomic_write_bytes
from numclip_cli.backbone import (
    NO_WEIGHTS,
    NOT_FOUND,
    STORED_WEIGHTS,
    WEIGHT_FILE_SUFFIXES,
    Backbone,
    inline_backbone,
    is_known_model,
    load_backbone,
    not_a_regular_file,
)
from numclip_cli.errors import CheckpointError, NumclipError, UsageError
from numclip_cli.inline_config import check_inline_config
from numclip_cli.model.methods import OrdinalModel, create_model
from numclip_cli.tasks import TaskSpec, task_from_dict

FORMAT_KEY = "numclip.format"
FORMAT_VERSION = 1
_JSON_FIELDS = ("task", "backbone", "train", "calibration", "resume")
BACKBONE_PREFIX = "clip."
VISUAL_PREFIX = "clip.visual."
# what a backbone name in metadata may look like: an open_clip architecture name, never a path or a schema
BACKBONE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, validated."""

    tensors: dict[str, torch.Tensor]
    task: TaskSpec
    method: str
    backbone: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    resume: dict[str, Any] | None = None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; any problem is a one-line ``CheckpointError``."""
    from safetensors import safe_open

    path = Path(path)
    problem = not_a_regular_file(path)
    if problem:
        raise CheckpointError(f"checkpoint not found: {path}" if problem == NOT_FOUND else
                              f"checkpoint {path} is {problem}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error type, or OSError/ValueError
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or another format: "
                              f"{_one_line(exc)})") from None
    if FORMAT_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file but not a numclip checkpoint (no {FORMAT_KEY!r})")
    if meta[FORMAT_KEY] != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: numclip checkpoint format {meta[FORMAT_KEY]!r} is not supported "
                              f"(this numclip reads format {FORMAT_VERSION}); upgrade numclip")
    try:
        fields = {name: json.loads(meta[name]) for name in _JSON_FIELDS if name in meta}
        task = task_from_dict(fields["task"], source=f"{path}: task")
        method, backbone = meta["method"], fields["backbone"]
        if not (isinstance(backbone, dict) and isinstance(backbone.get("name"), str)
                and isinstance(backbone.get("pretrained"), str)):
            raise KeyError("backbone name/pretrained")
        if not BACKBONE_LABEL.fullmatch(backbone["name"]):
            raise CheckpointError(f"{path}: backbone name {backbone['name'][:80]!r} is not an architecture name "
                                  f"(letters, digits, '.', '_', '+', '-'; no paths or schemas)")
        pretrained = backbone["pretrained"]
        if not BACKBONE_LABEL.fullmatch(pretrained) or pretrained.lower().endswith(WEIGHT_FILE_SUFFIXES):
            raise CheckpointError(f"{path}: names its backbone weights {pretrained[:80]!r}, but checkpoint metadata "
                                  f"may only name an open_clip pretrained tag, never a file, folder or hub repository")
    except CheckpointError:
        raise
    except (KeyError, json.JSONDecodeError, NumclipError) as exc:
        raise CheckpointError(f"{path}: damaged metadata: {_one_line(exc)}") from None
    return Checkpoint(tensors=tensors, task=task, method=method, backbone=backbone, train=fields.get("train", {}),
                      calibration=fields.get("calibration"), resume=fields.get("resume"))


def model_tensors(model: OrdinalModel, backbone: Backbone, tuned_image: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must carry to rebuild ``model`` exactly.

    A backbone that cannot be named by an open_clip pretrained tag (random init, a weights file, a hub or
    local bundle) is stored too, so the checkpoint never has to point at a file or a repository; frozen tensors
    whose values are all fp16-representable (the trainer's ``round_frozen_init`` makes them so) are stored as
    fp16, which halves the shipped demo checkpoint.
    """
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith(BACKBONE_PREFIX):
            tuned = tuned_image and key.startswith(VISUAL_PREFIX)
            if not (backbone.stored_in_checkpoint or tuned):
                continue
            if not tuned and value.dtype == torch.float32 and torch.equal(value.half().float(), value):
                value = value.half()  # lossless: only when every value is exactly representable
        tensors[key] = value
    return tensors


@torch.no_grad()
def round_frozen_init(model: OrdinalModel) -> None:
    """Round a randomly initialised backbone to fp16-representable values (see ``model_tensors``)."""
    for tensor in model.clip.state_dict().values():
        if tensor.dtype == torch.float32:
            tensor.copy_(tensor.half().float())


def write_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write a checkpoint atomically (temp file + fsync + rename)."""
    from safetensors.torch import save

    meta = {FORMAT_KEY: str(FORMAT_VERSION), "method": checkpoint.method, "task": json.dumps(checkpoint.task.to_dict())}
    for name in ("backbone", "train", "calibration", "resume"):
        value = getattr(checkpoint, name)
        if value is not None:
            meta[name] = json.dumps(value)
    # safetensors wants contiguous CPU tensors that share no storage
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in checkpoint.tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_state(model: OrdinalModel, tensors: dict[str, torch.Tensor], source: str,
               require_backbone: bool = False) -> None:
    """Load checkpoint tensors into a freshly built model, naming any mismatch or missing tensor."""
    expected = model.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise CheckpointError(f"{source}: tensor {key!r} does not belong to this model/backbone")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the backbone "
                                  f"expects {tuple(expected[key].shape)}")
        if value.dtype.is_floating_point != expected[key].dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected {expected[key].dtype}")
    missing = [key for key in expected
               if key not in tensors and (require_backbone or not key.startswith(BACKBONE_PREFIX))]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:3]} for method {model.method!r}")
    model.load_state_dict(tensors, strict=False)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[OrdinalModel, Backbone, Checkpoint]:
    """Rebuild the model a checkpoint describes, on ``device``, in eval mode."""
    ckpt = read_checkpoint(path)
    stored = {key: tuple(value.shape) for key, value in ckpt.tensors.items()}
    backbone = checkpoint_backbone(ckpt.backbone, str(path), device, stored)
    try:
        model = create_model(ckpt.method, backbone, ckpt.task)
    except UsageError as exc:  # e.g. a method this numclip does not know: the file is the problem, not the user
        raise CheckpointError(f"{path}: {exc}") from None
    load_state(model, ckpt.tensors, str(path), require_backbone=backbone.stored_in_checkpoint)
    return model.eval(), backbone, ckpt


def checkpoint_backbone(info: dict[str, Any], source: str, device: torch.device | str = "cpu",
                        stored: dict[str, tuple[int, ...]] | None = None) -> Backbone:
    """The backbone checkpoint metadata describes, built by the only two routes metadata may take: an open_clip
    architecture with one of its known pretrained tags, or an architecture (by name, or an inline config) whose
    every tensor the checkpoint carries. Nothing named by metadata is ever read as a file or fetched as a repo.

    For the second route, ``stored`` (checkpoint tensor name → shape) is checked against the declared
    architecture built on the meta device first, so a small file declaring a huge model is refused before
    anything is allocated.
    """
    import open_clip

    name, pretrained, cfg = info["name"], info["pretrained"], info.get("model_cfg") or {}
    known = is_known_model(name)
    if pretrained in (NO_WEIGHTS, STORED_WEIGHTS):
        if known and (not cfg or cfg == open_clip.get_model_config(name)):
            def build(on: torch.device | str) -> Backbone:
                return load_backbone(name, NO_WEIGHTS, device=on)
        else:
            try:
                check_inline_config(cfg)
            except ValueError as exc:
                raise CheckpointError(f"{source}: backbone {name!r}: {exc}") from None

            def build(on: torch.device | str) -> Backbone:
                return inline_backbone(name, cfg, device=on)
        if stored is not None:
            _check_carried(build("meta"), stored, source)
        return dataclasses.replace(build(device), pretrained=pretrained)
    if not known:
        raise CheckpointError(f"{source}: backbone {name!r} is not an open_clip architecture, so it has no "
                              f"pretrained tag {pretrained!r}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise CheckpointError(f"{source}: {pretrained!r} is not a pretrained tag of {name} (known: "
                              f"{', '.join(tags) or 'none'})")
    return load_backbone(name, pretrained, device=device)


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
