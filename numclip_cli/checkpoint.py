"""numclip checkpoints: one ``.safetensors`` file of trained tensors + JSON metadata; never unpickled.

Metadata keys (string → JSON string): ``numclip.format``, ``task``, ``method``, ``backbone``, ``train``, and
``calibration`` once calibrated. Backbone tensors are stored only when they cannot be rebuilt from the
backbone's name and pretrained tag (random init, or an image tower that was fine-tuned).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from numclip_cli.atomic import atomic_write_bytes
from numclip_cli.backbone import Backbone, inline_backbone, is_known_model, load_backbone
from numclip_cli.errors import CheckpointError, NumclipError, UsageError
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
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
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
    except CheckpointError:
        raise
    except (KeyError, json.JSONDecodeError, NumclipError) as exc:
        raise CheckpointError(f"{path}: damaged metadata: {_one_line(exc)}") from None
    return Checkpoint(tensors=tensors, task=task, method=method, backbone=backbone, train=fields.get("train", {}),
                      calibration=fields.get("calibration"), resume=fields.get("resume"))


def model_tensors(model: OrdinalModel, backbone: Backbone, tuned_image: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must carry to rebuild ``model`` exactly.

    A randomly initialised backbone is stored too; frozen tensors whose values are all fp16-representable (the
    trainer's ``round_frozen_init`` makes them so) are stored as fp16, which halves the shipped demo checkpoint.
    """
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith(BACKBONE_PREFIX):
            tuned = tuned_image and key.startswith(VISUAL_PREFIX)
            if not (backbone.random_init or tuned):
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
    info = ckpt.backbone
    if is_known_model(info["name"]):
        backbone = load_backbone(info["name"], info["pretrained"], device=device)
    elif isinstance(info.get("model_cfg"), dict) and info["model_cfg"]:
        backbone = inline_backbone(info["name"], info["model_cfg"], device=device)
    else:
        raise CheckpointError(f"{path}: backbone {info['name']!r} is not an open_clip architecture and the "
                              f"checkpoint carries no config for it")
    try:
        model = create_model(ckpt.method, backbone, ckpt.task)
    except UsageError as exc:  # e.g. a method this numclip does not know: the file is the problem, not the user
        raise CheckpointError(f"{path}: {exc}") from None
    load_state(model, ckpt.tensors, str(path), require_backbone=backbone.random_init)
    return model.eval(), backbone, ckpt
