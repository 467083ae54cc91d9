"""The names of the built-in tasks and methods, importable without torch, numpy or Pillow (``--help`` stays fast).

The registries themselves are ``tasks.list_tasks()`` (the task specs shipped as package data, listed here) and
``model.methods.METHODS`` (which imports torch); a test keeps ``METHOD_NAMES`` equal to the latter's keys.
"""

from __future__ import annotations

from importlib import resources

# every ``--method``, in the order help texts and the accuracy benchmark list them
METHOD_NAMES = ("numclip", "numclip-position", "numclip-ssr", "l2rclip", "ordinalclip", "coop", "zeroshot",
                "linear-probe")
UNTRAINED_METHODS = ("zeroshot",)  # nothing to train: predict only


def task_names() -> list[str]:
    """Names of the built-in tasks: the TOML specs in ``numclip_cli/task_specs``."""
    folder = resources.files("numclip_cli") / "task_specs"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def task_choices() -> str:
    """The built-in task names as a help text lists them (``aesthetics, age, hci``)."""
    return ", ".join(task_names())
