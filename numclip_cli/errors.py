"""Errors a user can cause; the CLI layer turns each into a one-line message and an exit code."""


class NumclipError(Exception):
    """Base class: something the user can fix. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class UsageError(NumclipError):
    """Bad options or arguments (exit 2)."""

    exit_code = 2


class TaskSpecError(UsageError):
    """A task spec that cannot be used; the message names the offending field."""


class WeightsError(NumclipError):
    """Backbone weights are missing or unreadable."""


class CheckpointError(NumclipError):
    """A numclip checkpoint that cannot be loaded."""


class DataError(NumclipError):
    """A dataset, list or label file that cannot be used."""
