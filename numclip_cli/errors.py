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


def one_line(error: BaseException | str, limit: int | None = 200) -> str:
    """An error (or a message) as one line for stderr or an error record: whitespace collapsed, cut at ``limit``.

    An exception without a message gives its type's name.

    >>> one_line(OSError("disk\\n  full"))
    'disk full'
    >>> one_line(KeyError()), one_line("x" * 300, limit=5)
    ('KeyError', 'xxxxx')
    """
    text = " ".join(str(error).split())[:limit]
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")


def visible(text: str) -> str:
    r"""``text`` with every non-printable character (ESC, CR, BEL, bidi overrides ...) as its Python escape.

    A terminal acts on control characters (an ESC sequence recolours it or rewrites its title, a CR overwrites
    the line), so a file name must not carry them to the screen.

    >>> visible("a\x1b[31mred\r.png")
    'a\\x1b[31mred\\r.png'
    """
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
