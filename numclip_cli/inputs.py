"""Input discovery for ``predict``: files, directories, globs and ``-`` (stdin), in input order, plus sharding.

Paths are kept as Python gives them for the file system (``os.fsdecode``): a name that is not valid UTF-8 holds
lone surrogates (``\udcff`` for the byte 0xff), so it can still be opened. ``record_path`` turns such a path into
the fields a record carries, and ``path_from_record`` turns those fields back into the same path.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from numclip_cli.errors import UsageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}
)
STDIN = "-"


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix (used when scanning directories)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def record_path(path: str) -> dict[str, str]:
    """The path fields of an output record: ``path``, plus ``path_bytes`` when the name is not valid UTF-8.

    ``path`` is always valid UTF-8 text: the name itself, or with each undecodable byte shown as U+FFFD.
    ``path_bytes`` (standard base64 of the name's bytes) is present only then, so the exact file can be found.

    >>> record_path("photos/a.png")
    {'path': 'photos/a.png'}
    >>> record_path(os.fsdecode(b"caf\\xe9.png"))
    {'path': 'caf\ufffd.png', 'path_bytes': 'Y2Fm6S5wbmc='}
    """
    try:
        path.encode("utf-8")
        return {"path": path}
    except UnicodeEncodeError:
        raw = _name_bytes(path)
        return {"path": raw.decode("utf-8", "replace"), "path_bytes": base64.b64encode(raw).decode("ascii")}


def path_from_record(record: Mapping[str, Any]) -> str:
    """The input path a record was written for (inverse of ``record_path``); KeyError/ValueError if malformed."""
    if "path_bytes" not in record:
        return record["path"]
    try:
        return os.fsdecode(base64.b64decode(record["path_bytes"], validate=True))
    except (TypeError, binascii.Error) as exc:
        raise ValueError(f"bad path_bytes: {exc}") from None


def _name_bytes(path: str) -> bytes:
    """The bytes of a file name; a lone surrogate that no file name can hold is kept as its UTF-8 form."""
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogatepass")


def read_path_list(stream: TextIO, null: bool = False) -> list[str]:
    """Paths from a stream: newline-separated (a trailing CR is dropped) or NUL-separated with ``null``.

    The stream's bytes are read when it has them (``sys.stdin``): names are decoded as the file system does,
    so a name that is not valid UTF-8 is kept exactly, whatever the terminal's locale.
    """
    buffer = getattr(stream, "buffer", None)
    text = os.fsdecode(buffer.read()) if buffer is not None else stream.read()
    if null:
        return [p for p in text.split("\0") if p]
    return [p.removesuffix("\r") for p in text.split("\n") if p.strip()]


class UnreadableFolder(str):
    """An input that is a folder numclip could not list: its path, with the one-line ``reason`` for its record.

    It travels with the image paths (sharding, ``--skip-existing`` and input order treat it as one input), so
    the images it hides are reported as one error record instead of silently missing.
    """

    reason: str

    def __new__(cls, path: str, reason: str) -> UnreadableFolder:
        folder = super().__new__(cls, path)
        folder.reason = reason
        return folder

    def __reduce__(self) -> tuple:
        # decode workers may receive the inputs pickled: keep the reason
        return UnreadableFolder, (str(self), self.reason)


def _folder_error(exc: OSError) -> str:
    """``cannot read folder: permission denied`` and the like."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot read folder: {text[:1].lower()}{text[1:]}"


def scan_directory(root: str, recursive: bool) -> Iterator[str]:
    """Image-named entries under ``root`` in sorted order; symlinked directories are visited once (no loops).

    A folder that cannot be listed (permission denied, vanished, I/O error) is yielded as an ``UnreadableFolder``.
    """
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield UnreadableFolder(folder, _folder_error(exc))
            continue
        subdirs = []
        for entry in entries:
            # image-named entries are inputs even when they are directories or broken links: they become
            # error records instead of silently disappearing
            if is_image_name(entry.name):
                yield entry.path
            elif recursive and _is_dir(entry):
                subdirs.append(entry.path)
        stack.extend(reversed(subdirs))


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is (or links to) a folder; one whose type cannot be read is tried as a folder."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # listing it then reports the reason as an UnreadableFolder
        return True


def _has_glob(arg: str) -> bool:
    return any(ch in arg for ch in "*?[")


def glob_inputs(pattern: str, recursive: bool) -> list[str]:
    """What ``glob.glob(pattern, recursive=recursive)`` matches, sorted, plus every folder the pattern had to
    list but could not, as an ``UnreadableFolder`` (glob skips those silently).

    As in glob, a wildcard never matches a name starting with "." unless its pattern component does, and with
    ``recursive`` a ``**`` component matches any number of nested folders, none included; a trailing ``**``
    gives everything below its folder (not the folder itself). Each real folder is read once per ``**``.
    """
    parts = [part for part in pattern.split(os.sep) if part]
    return sorted(_glob_in(os.sep if os.path.isabs(pattern) else "", parts, recursive, set()))


def _glob_in(folder: str, parts: list[str], recursive: bool, seen: set[tuple[str, int]]) -> Iterator[str]:
    """Matches of the pattern components ``parts`` inside ``folder`` ("" is the current folder)."""
    part, rest = parts[0], parts[1:]
    if not _has_glob(part):  # a literal name: no listing needed
        path = os.path.join(folder, part)
        if not rest and os.path.lexists(path):
            yield path
        elif rest and os.path.isdir(path):
            yield from _glob_in(path, rest, recursive, seen)
        return
    anywhere = recursive and part == "**"
    if anywhere:
        key = (os.path.realpath(folder or os.curdir), len(parts))
        if key in seen:  # a symlink back up the tree
            return
        seen.add(key)
    try:
        entries = sorted(os.scandir(folder or os.curdir), key=lambda e: e.name)
    except OSError as exc:
        yield UnreadableFolder(folder or os.curdir, _folder_error(exc))
        return
    if anywhere and rest:
        yield from _glob_in(folder, rest, recursive, seen)  # ** as no folder at all
    for entry in entries:
        if entry.name.startswith(".") and not part.startswith("."):
            continue
        path = os.path.join(folder, entry.name)
        if anywhere or fnmatch.fnmatchcase(entry.name, part):
            if not rest:
                yield path
            if (rest or anywhere) and _is_dir(entry):
                yield from _glob_in(path, parts if anywhere else rest, recursive, seen)


def expand_inputs(args: Iterable[str], stdin: TextIO | None = None, recursive: bool = False,
                  null: bool = False) -> list[str]:
    """Every input path, in the order given; a path that does not exist is kept (it becomes an error record)."""
    paths: list[str] = []
    for arg in args:
        if arg == STDIN:
            if stdin is None:
                raise UsageError("'-' given but no standard input is available")
            paths.extend(read_path_list(stdin, null=null))
        elif os.path.isdir(arg):
            paths.extend(scan_directory(arg, recursive))
        elif not os.path.lexists(arg) and _has_glob(arg):
            matches = glob_inputs(arg, recursive)
            paths.extend(matches if matches else [arg])
        else:
            paths.append(arg)
    return paths


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → (I, N) with 0 ≤ I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def take_shard(paths: list[str], index: int, count: int) -> list[str]:
    """Every ``count``-th path starting at ``index``: N shards cover the input exactly once."""
    return paths[index::count]
