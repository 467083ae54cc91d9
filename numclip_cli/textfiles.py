"""Reading the small text files a user points numclip at (task specs, data lists, CSV/TSV), safely.

A path given on the command line can name anything: a FIFO with no writer (``open`` blocks forever), a device
that never ends (``/dev/zero``, ``/dev/urandom``), a directory, or a regular file far larger than any real spec
or list. ``read_text_file`` reads only regular files of at most a stated size and says in one line what was
refused. The checks are made on the open descriptor (``fstat``), so a file swapped for a FIFO or device after the
first look is refused too; opening with ``O_NONBLOCK`` keeps that swap from hanging the ``open`` itself.
"""

from __future__ import annotations

import os
import stat

from numclip_cli.errors import NumclipError

# A task spec is a name, a prompt and a few bins (the built-ins are < 1 KiB); 1 MiB leaves room for thousands of
# bins while parsing stays instant.
MAX_TASK_SPEC_BYTES = 1 << 20
# A data list (CSV/TSV ``path,label`` or ``<path> <label>`` lines) of 256 MiB holds ~3 million rows of 80 bytes;
# parsing it takes a few GB of RAM, the most a labelled dataset read on one machine should ask for.
MAX_DATA_LIST_BYTES = 256 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(mode: int) -> str | None:
    """Why a file of this ``stat`` mode is not read ("a directory, not a regular file" …); None for a regular file.

    The one wording of every "not a file" refusal (task specs, data lists, checkpoints, weight files).
    """
    if stat.S_ISREG(mode):
        return None
    return next((f"{kind}, not a regular file" for test, kind in _KINDS if test(mode)), "not a regular file")


def read_text_file(path: str | os.PathLike[str], max_bytes: int, what: str,
                   error: type[NumclipError] = NumclipError) -> str:
    """The UTF-8 text (a leading BOM dropped) of the regular file ``path``; ``error`` with a one-line reason else.

    ``what`` names the file in messages ("task spec", "data list").
    """
    name = os.fsdecode(path)
    try:
        _check(os.stat(path), name, max_bytes, what, error)  # before open: a FIFO's open would block
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise error(f"{what} not found: {name}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise error(f"cannot read {what} {name!r}: the name contains a NUL byte") from None
    with os.fdopen(fd, "rb") as handle:
        try:
            _check(os.fstat(fd), name, max_bytes, what, error)  # what was opened, not what was looked at
            data = handle.read(max_bytes + 1)  # + 1: a file that grew past the limit since fstat is seen
        except OSError as exc:
            raise error(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(_too_large(name, len(data), max_bytes, what))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {name} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _check(st: os.stat_result, name: str, max_bytes: int, what: str, error: type[NumclipError]) -> None:
    """Refuse anything but a regular file of at most ``max_bytes``."""
    problem = not_regular(st.st_mode)
    if problem:
        raise error(f"{what} {name} is {problem}")
    if st.st_size > max_bytes:
        raise error(_too_large(name, st.st_size, max_bytes, what))


def _too_large(name: str, size: int, max_bytes: int, what: str) -> str:
    return f"{what} {name} is too large ({size:,} bytes; the limit is {max_bytes:,})"
