"""Writing output files safely: atomic replacement of regular files, written through symlinks, straight into
character devices and FIFOs, and checked before any work is done.

A regular file is written to a temp file in its folder, fsynced, then renamed over it: readers never see half a
file. A symlink is followed, as shell redirection does: its final target is replaced and the link stays. A
character device (``/dev/null``) or a FIFO is written directly; replacing it would make it a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from numclip_cli.errors import NumclipError, UsageError

# Write errors that mean "no room": a full disk, a full quota, a file-size limit (ulimit -f).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or quota, or file-size limit) is full."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def is_stream(mode: int) -> bool:
    """Whether a file of this ``st_mode`` is written in place (a character device or a FIFO)."""
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def target_mode(path: str | os.PathLike) -> int | None:
    """``st_mode`` of what writing ``path`` reaches (symlinks followed); None when nothing is there yet."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def final_path(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` replaces: symlinks resolved, so the link itself stays a link."""
    return Path(os.path.realpath(path))


def check_writable_target(path: str | os.PathLike, option: str) -> None:
    """Fail before any work (``UsageError``, exit 2) if ``option``'s ``path`` cannot be written.

    The target must be a file (existing or not) in an existing, writable folder, a character device or a FIFO;
    never a folder.
    """
    where = f"{option} {path}"
    try:
        mode = target_mode(path)
    except OSError as exc:  # a symlink loop, a folder that cannot be searched
        raise UsageError(f"{where}: {exc.strerror}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{where}: is a folder; give a file name")
    if mode is not None and is_stream(mode):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{where}: not writable")
        return
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(f"{where}: not a regular file, character device or FIFO")
    folder = final_path(path).parent
    if not folder.is_dir():
        raise UsageError(f"{where}: {folder} is not a folder" if folder.exists() else
                         f"{where}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: folder {folder} is not writable")


def check_writable_targets(*targets: tuple[str, str | os.PathLike | None]) -> None:
    """``check_writable_target`` for each ``(option, path)``; a None path (option not given) is skipped."""
    for option, path in targets:
        if path is not None:
            check_writable_target(path, option)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _final_mode(target: Path) -> int:
    """Keep an existing file's permissions; a new file gets the usual 0666 minus the umask (mkstemp uses 0600)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temp files ``.NAME.<pid>.<random>.tmp`` beside ``target`` whose writing process is dead.

    A process killed outright (SIGKILL, the OOM killer) cannot clean up; the next write of the same file does.
    Returns the files removed.
    """
    removed = []
    prefix = f".{target.name}."
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent if str(target.parent) else "."):
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
                continue
            pid = entry.name[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def naming_full_disk(shown: str) -> Iterator[None]:
    """A full disk inside the block (a write, a flush, a close) becomes a one-line ``NumclipError`` naming
    ``shown``, for what is written in place (a device, a FIFO, standard output): there is no previous file to keep."""
    try:
        yield
    except OSError as exc:
        if no_space(exc):
            raise NumclipError(f"no space left while writing {shown} ({os.strerror(exc.errno)})") from exc
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open ``path`` for a complete rewrite: a temp file beside it replaces it on clean exit, is removed on error.

    A symlink is written through (its final target is replaced); a character device or FIFO is opened and
    written directly. A full disk becomes a one-line ``NumclipError`` saying that the previous ``path`` is intact.
    """
    shown = Path(path)
    existing = target_mode(shown)
    if existing is not None and is_stream(existing):
        with naming_full_disk(str(shown)), open(shown, mode, **kwargs) as handle:
            yield handle
        return
    target = final_path(shown)
    folder = target.parent
    remove_stale_temps(target)
    # the pid in the name tells a later writer whether this temp file's process is still alive
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, _final_mode(target))
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if no_space(exc):
            kept = f"the previous {shown.name} is intact" if target.exists() else "nothing was written"
            raise NumclipError(f"no space left while writing {shown} ({os.strerror(exc.errno)}); {kept}") from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
