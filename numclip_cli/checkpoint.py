"""The numclip checkpoint file format: one ``.safetensors`` file of tensors + JSON metadata; never unpickled.

Metadata keys (string → JSON string): ``numclip.format``, ``method``, ``task``, ``backbone`` (an open_clip
architecture name and pretrained tag, or ``none``/``stored`` with the architecture's config when the file
carries the whole backbone), ``preprocess`` (see numclip_cli.preprocessing), ``train``, ``calibration`` once
calibrated, and ``resume`` in the resumable ``*.last.safetensors`` (whose ``optim.*`` tensors hold the optimizer
state). Backbone tensors are stored only when an open_clip pretrained tag cannot rebuild them (random init, a
weights file or bundle, or an image tower that was fine-tuned). Rebuilding a model from a checkpoint is
numclip_cli.factory's job; this module reads, validates and writes the file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from numclip_cli.atomic import atomic_write_bytes
from numclip_cli.backbone import NOT_FOUND, WEIGHT_FILE_SUFFIXES, Backbone, not_a_regular_file
from numclip_cli.errors import CheckpointError, NumclipError, one_line
from numclip_cli.model.methods import OrdinalModel
from numclip_cli.preprocessing import Preprocessing
from numclip_cli.tasks import TaskSpec, task_from_dict

FORMAT_KEY = "numclip.format"
FORMAT_VERSION = 3
# Every format this numclip reads, with the method names that changed since: format 1 (numclip 0.1) named the
# reference NumCLIP design "numclip" (now "numclip-ssr"); format 2 (numclip 0.2) named the position-head design
# "numclip" (now "numclip-position"); in format 3 "numclip" is the offset-head design.
METHOD_RENAMES = {"1": {"numclip": "numclip-ssr"}, "2": {"numclip": "numclip-position"}, str(FORMAT_VERSION): {}}
_JSON_FIELDS = ("task", "backbone", "preprocess", "train", "calibration", "resume")
OPTIM_PREFIX = "optim."
BACKBONE_PREFIX = "clip."
VISUAL_PREFIX = "clip.visual."
_OPTIM_ENTRY = re.compile(r"([0-9]{1,9})\.([A-Za-z_][A-Za-z0-9_]*)")  # <parameter index>.<state key>
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
    preprocess: dict[str, Any] | None = None  # None: written before numclip stored it (see preprocessing.py)

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors, without the optimizer state a ``last`` checkpoint also carries."""
        return {key: value for key, value in self.tensors.items() if not key.startswith(OPTIM_PREFIX)}


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
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # a handle, not a dict
    except Exception as exc:  # safetensors raises its own error type, or OSError/ValueError
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or another format: "
                              f"{one_line(exc)})") from None
    if FORMAT_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file but not a numclip checkpoint (no {FORMAT_KEY!r})")
    if meta[FORMAT_KEY] not in METHOD_RENAMES:
        raise CheckpointError(f"{path}: numclip checkpoint format {meta[FORMAT_KEY]!r} is not supported "
                              f"(this numclip reads formats {', '.join(METHOD_RENAMES)}); upgrade numclip")
    try:
        fields = {name: json.loads(meta[name]) for name in _JSON_FIELDS if name in meta}
        task = task_from_dict(fields["task"], source="task")
        method, backbone = meta["method"], fields["backbone"]
        method = METHOD_RENAMES[meta[FORMAT_KEY]].get(method, method)
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
        if "preprocess" in fields:
            Preprocessing.from_metadata(fields["preprocess"])
    except CheckpointError:
        raise
    except (KeyError, ValueError, RecursionError, NumclipError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: damaged metadata: {one_line(exc)}") from None
    return Checkpoint(tensors=tensors, task=task, method=method, backbone=backbone, train=fields.get("train", {}),
                      calibration=fields.get("calibration"), resume=fields.get("resume"),
                      preprocess=fields.get("preprocess"))


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
    for name in ("backbone", "preprocess", "train", "calibration", "resume"):
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


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state → tensors (``optim.<param>.<key>``) + JSON (param groups and non-tensor entries)."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": jsonable(state["param_groups"]), "optimizer_scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], resume: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state ``optimizer_tensors`` split into tensors and ``resume`` metadata, put back together;
    an entry not named ``<parameter index>.<key>`` is a ``ValueError``."""
    scalars = resume.get("optimizer_scalars", {})
    if not isinstance(scalars, dict):
        raise ValueError("'optimizer_scalars' is not a table")
    entries = [(name[len(OPTIM_PREFIX):], value) for name, value in tensors.items() if name.startswith(OPTIM_PREFIX)]
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*entries, *scalars.items()]:
        match = _OPTIM_ENTRY.fullmatch(name)
        if not match:
            raise ValueError(f"optimizer state entry {name[:80]!r} is not '<parameter index>.<key>'")
        state.setdefault(int(match[1]), {})[match[2]] = value
    return {"state": state, "param_groups": resume["param_groups"]}


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (Counters become dicts, anything else unknown a string)."""
    return json.loads(json.dumps(value, default=lambda o: dict(o) if isinstance(o, Counter) else str(o)))
