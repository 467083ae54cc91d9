"""Input discovery for ``predict``: files, directories, globs and ``-`` (stdin), in input order, plus sharding."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from typing import TextIO

from numclip_cli.errors import UsageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}
)
STDIN = "-"


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix (used when scanning directories)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def read_path_list(stream: TextIO, null: bool = False) -> list[str]:
    """Paths from a stream: newline-separated (a trailing CR is dropped) or NUL-separated with ``null``."""
    text = stream.read()
    if null:
        return [p for p in text.split("\0") if p]
    return [p.removesuffix("\r") for p in text.split("\n") if p.strip()]


def scan_directory(root: str, recursive: bool) -> Iterator[str]:
    """Image-named entries under ``root`` in sorted order; symlinked directories are visited once (no loops)."""
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
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            # image-named entries are inputs even when they are directories or broken links: they become
            # error records instead of silently disappearing
            if is_image_name(entry.name):
                yield entry.path
            elif recursive and entry.is_dir(follow_symlinks=True):
                subdirs.append(entry.path)
        stack.extend(reversed(subdirs))


def _has_glob(arg: str) -> bool:
    return any(ch in arg for ch in "*?[")


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
            matches = sorted(glob.glob(arg, recursive=recursive))
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
