"""Turn the user's model options (--checkpoint / --model / --pretrained / --task) into a ready model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from numclip_cli.backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED, NO_WEIGHTS, Backbone, load_backbone
from numclip_cli.checkpoint import Checkpoint, load_model
from numclip_cli.errors import UsageError
from numclip_cli.model.methods import OrdinalModel, create_model
from numclip_cli.names import task_choices
from numclip_cli.tasks import TaskSpec, get_task


@dataclass
class Session:
    """A model on a device with its backbone, task and (when loaded from a file) checkpoint."""

    model: OrdinalModel
    backbone: Backbone
    task: TaskSpec
    checkpoint: Checkpoint | None
    warnings: list[str]


def default_pretrained(name: str) -> str:
    """The pretrained tag used when none is given: ``openai`` where it exists, else the first known tag."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return DEFAULT_PRETRAINED
    tags = open_clip.list_pretrained_tags_by_model(name)
    if DEFAULT_PRETRAINED in tags:
        return DEFAULT_PRETRAINED
    return tags[0] if tags else NO_WEIGHTS


def open_session(device: Any, checkpoint: str | None = None, model: str | None = None,
                 pretrained: str | None = None, task: str | None = None, method: str = "zeroshot") -> Session:
    """Load a checkpoint (which carries its task and backbone) or build ``method`` on a named backbone."""
    warnings: list[str] = []
    if checkpoint:
        if model or pretrained:
            raise UsageError("--checkpoint carries its own backbone: do not combine it with --model/--pretrained")
        net, backbone, ckpt = load_model(checkpoint, device)
        if task and task != ckpt.task.name and get_task(task) != ckpt.task:
            raise UsageError(f"--task {task!r} does not match the checkpoint's task {ckpt.task.name!r}; "
                             f"drop --task (the checkpoint carries it)")
        return Session(net, backbone, ckpt.task, ckpt, warnings)
    if not task:
        raise UsageError(f"give --task ({task_choices()} or a .toml/.json spec) or --checkpoint FILE")
    spec = get_task(task)
    name = model or DEFAULT_MODEL
    tag = pretrained or default_pretrained(name)
    if tag.lower() == NO_WEIGHTS:
        warnings.append(f"--pretrained none: {name} is randomly initialised, predictions are meaningless "
                        f"until it is trained")
    backbone = load_backbone(name, tag, device=device)
    return Session(create_model(method, backbone, spec).eval(), backbone, spec, None, warnings)
