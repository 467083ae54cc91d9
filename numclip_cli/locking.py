"""Claiming output files: checked before any work, then locked so that a second numclip writing the same file
fails at once instead of interleaving its records or passing off the other run's checkpoint as its own.

The lock is an advisory ``flock`` on ``.NAME.lock`` beside the file that is written (beside a symlink's target).
The kernel releases it when its holder exits, however it exits, so a killed run never blocks the next one; the
lock file itself is removed on a clean exit and reused after a crash. Character devices and FIFOs are not locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from numclip_cli.atomic import check_writable_targets, final_path, is_stream, target_mode
from numclip_cli.errors import NumclipError, UsageError

# The lock descriptors this process holds. A forked child (a DataLoader decoding worker) shares each one's flock,
# so it closes its copies at once: otherwise workers orphaned by a killed run would hold its locks for as long as
# they linger, and the next run would be refused in the name of a dead process.
_HELD: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards writes to ``path``."""
    final = final_path(path)
    return final.with_name(f".{final.name}.lock")


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (a pid), for the message."""
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(os.pread(fd, 32, 0).decode())}"
    return "pid unknown"


def _acquire(lock: Path, path: str | os.PathLike, option: str) -> int | None:
    """Lock ``lock`` without waiting; returns its descriptor (None where the filesystem has no locks)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise NumclipError(f"{path} is being written by another numclip process ({holder}); wait for it or "
                               f"choose another {option}") from None
        except OSError:  # no lock support (some network filesystems): write unguarded, as before
            os.close(fd)
            return None
        # the previous holder removes the file when it is done: if that happened between our open and our lock,
        # we hold a lock on a deleted file that nobody else can see; try again on the file that is there now
        with contextlib.suppress(FileNotFoundError):
            there, ours = os.stat(lock, follow_symlinks=False), os.fstat(fd)
            if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                _HELD.add(fd)
                return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, option: str) -> Iterator[None]:
    """Hold the lock on ``path`` (``option`` names it in the message if another process holds it)."""
    mode = target_mode(path)
    if mode is not None and is_stream(mode):
        yield
        return
    lock = lock_path(path)
    fd = _acquire(lock, path, option)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still holding it: a waiting process then sees a different file
            _HELD.discard(fd)
            os.close(fd)


@contextlib.contextmanager
def claim_outputs(*targets: tuple[str, str | os.PathLike | None], lock: bool = True) -> Iterator[None]:
    """Check every ``(option, path)`` before any work (exit 2 if one cannot be written), then lock them (exit 1
    if another process is writing one) until the block ends. Options not given (None) are skipped."""
    given = [(option, path) for option, path in targets if path is not None]
    check_writable_targets(*given)
    files: dict[Path, str] = {}
    for option, path in given:
        mode = target_mode(path)
        if mode is None or not is_stream(mode):
            final = final_path(path)
            if final in files:
                raise UsageError(f"{files[final]} and {option} name the same file {path}")
            files[final] = option
    with contextlib.ExitStack() as stack:
        if lock:
            for option, path in given:
                stack.enter_context(output_lock(path, option))
        yield


Target = tuple[str, "str | os.PathLike | None"]  # (what names it: an option or a description, its path or None)


def refuse_inputs_as_outputs(outputs: Iterable[Target], inputs: Iterable[Target]) -> None:
    """Exit 2 if an output is one of the files the command reads: writing it would destroy its own input (a
    checkpoint, an image, a data list, a task spec). Files are compared by identity (device and inode), so
    another spelling, a hard link or a symlink of the same file is caught; only outputs that already exist are
    compared (a file yet to be created is nobody's input), so the inputs are looked at only then."""
    existing: dict[tuple[int, int], tuple[str, str | os.PathLike]] = {}
    for option, path in ((option, path) for option, path in outputs if path is not None):
        with contextlib.suppress(OSError, ValueError):  # ValueError: a NUL byte in the path
            info = os.stat(path)
            if stat.S_ISREG(info.st_mode):
                existing[info.st_dev, info.st_ino] = (option, path)
    if not existing:
        return
    for what, path in ((what, path) for what, path in inputs if path is not None):
        with contextlib.suppress(OSError, ValueError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) in existing:
                option, target = existing[info.st_dev, info.st_ino]
                raise UsageError(f"{option} {target} is {what} {path}: writing it would destroy what this "
                                 f"command reads; choose another {option}")
