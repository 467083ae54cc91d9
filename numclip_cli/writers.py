"""Result writers for ``predict``: JSON lines and CSV; one record per input, written as it comes (the table for
people at a terminal is presentation, in ``cli/table.py``).

Every writer turns the record's path into ``inputs.record_path`` fields first, so a file name that is not valid
UTF-8 is written as valid text (``path``) plus its exact bytes (``path_bytes``), never a crash.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from numclip_cli.atomic import final_path, no_space, remove_stale_temps
from numclip_cli.errors import NumclipError
from numclip_cli.inputs import path_from_record, record_path

FORMATS = ("table", "jsonl", "csv")
_CSV_FIXED = ["path", "status", "task", "value", "value_max", "bin", "bin_index", "value_bin", "expected_bin",
              "interval_low", "interval_high", "bin_set", "coverage", "face_index", "face_box"]
_CSV_LAST = ["error", "path_bytes"]  # path_bytes last: a column added later must not shift the others


class JsonlWriter:
    """One JSON object per line, flushed per batch so pipelines see results as they complete."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, record: dict[str, Any]) -> None:
        """Write one record."""
        self.stream.write(json.dumps(with_path_fields(record), ensure_ascii=False) + "\n")

    def flush(self) -> None:
        """Push written records to the reader."""
        self.stream.flush()

    def close(self) -> None:
        """Nothing is buffered beyond the stream."""
        self.flush()


class CsvWriter(JsonlWriter):
    """A header, then one row per record; probabilities as ``p_<bin>`` columns."""

    def __init__(self, stream: IO[str], bin_names: list[str]) -> None:
        super().__init__(stream)
        self.prob_columns = [f"p_{name}" for name in bin_names]
        fields = [*_CSV_FIXED, *self.prob_columns, *_CSV_LAST]
        self.writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        # Before Python 3.13 the csv module leaves a field holding a lone "\r" unquoted when rows end in "\n", and
        # every reader then splits the row there; such rows are written with every field quoted.
        self.quoting_writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore", lineterminator="\n",
                                             quoting=csv.QUOTE_ALL)
        self.writer.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        """Flatten and write one record."""
        row = with_path_fields(record)
        for column, p in zip(self.prob_columns, (record.get("probs") or {}).values(), strict=False):
            row[column] = p
        if "interval" in record:
            row["interval_low"], row["interval_high"] = record["interval"]
        if "bin_set" in record:
            row["bin_set"] = "|".join(record["bin_set"])
        if record.get("face"):
            row["face_index"] = record["face"]["index"]
            row["face_box"] = " ".join(str(v) for v in record["face"]["box"])
        has_cr = any("\r" in value for value in row.values() if isinstance(value, str))
        (self.quoting_writer if has_cr else self.writer).writerow(row)


def with_path_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its path as ``record_path`` fields (``path``, and ``path_bytes`` when needed), path first."""
    return {**record_path(record["path"]), **{key: value for key, value in record.items() if key != "path"}}


def make_writer(fmt: str, stream: IO[str], bin_names: list[str]) -> JsonlWriter:
    """A machine-readable writer for ``fmt`` (jsonl, csv)."""
    if fmt == "csv":
        return CsvWriter(stream, bin_names)
    return JsonlWriter(stream)


def path_key(path: str) -> str:
    """What ``--skip-existing`` compares: the resolved path, so ``a.jpg``, ``./a.jpg`` and ``/abs/a.jpg`` match."""
    return os.path.realpath(path)


def record_key(record: dict[str, Any]) -> str:
    """The matching key of a written record (its input's ``path_key``; exact bytes for a non-UTF-8 name)."""
    return path_key(path_from_record(record))


def _first_of_input(record: dict[str, Any]) -> bool:
    """Whether a record starts its input's group (``--faces all`` writes one record per face)."""
    face = record.get("face")
    return not isinstance(face, dict) or face.get("index", 0) == 0


def _group_open(record: dict[str, Any]) -> bool:
    """Whether more records of the same input follow this one (face ``index`` < ``count`` − 1)."""
    face = record.get("face")
    return isinstance(face, dict) and face.get("index", 0) < face.get("count", 0) - 1


# Every JSONL record starts so (``JsonlWriter`` writes "path" first); a line that does not is no record of ours.
RECORD_START = b'{"path": '
# Far above any record (1000 bins of probabilities are ~40 KB): a longer line is read no further.
MAX_RECORD_BYTES = 1 << 24


def done_inputs(path: Path) -> tuple[Counter[str], int]:
    """How many times each input (by ``record_key``) is recorded in a JSONL output, and the byte length of its
    complete lines (for resuming). A missing file has none; a torn last line (an interrupted write) is left out,
    and so is an input whose ``--faces all`` group stops short of its ``count`` (a kill between its records):
    it is done again, whole.
    """
    done: Counter[str] = Counter()
    good = group_start = 0
    open_key = None  # the input whose group of face records is not complete yet
    if not path.exists():
        return done, good
    with path.open("rb") as handle:
        for number, line in enumerate(iter(lambda: handle.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if not line.endswith(b"\n"):
                if len(line) <= MAX_RECORD_BYTES and (line.startswith(RECORD_START) or RECORD_START.startswith(line)):
                    break  # an interrupted write of a record: drop the partial line
                raise NumclipError(f"{path} line {number} is not a numclip record (nor part of one): --skip-existing "
                                   f"appends only to numclip's own JSON lines output")
            try:
                record = json.loads(line)
                key, first, more = record_key(record), _first_of_input(record), _group_open(record)
            except (ValueError, KeyError, TypeError):
                raise NumclipError(f"{path} line {number} is not a numclip record: --skip-existing appends only "
                                   f"to numclip's own JSON lines output") from None
            if first:
                done[key] += 1
                group_start = good
            open_key = key if more else None
            good += len(line)
    if open_key is not None:
        done[open_key] -= 1
        good = group_start
    return done, good


def remaining(paths: list[str], done: Counter[str]) -> list[str]:
    """The inputs still to do, in order: an input listed k times with j records gets k - j more."""
    left = Counter(done)
    todo = []
    for path in paths:
        key = path_key(path)
        if left[key] > 0:
            left[key] -= 1
        else:
            todo.append(path)
    return todo


@contextlib.contextmanager
def appending(path: Path, keep_bytes: int) -> Iterator[IO[str]]:
    """Cut a JSONL output back to its first ``keep_bytes`` (its complete records; the file is created if missing)
    and open it to add records in place, so that every flushed record survives even a kill -9.

    If the disk fills up meanwhile, the file is cut back to its last complete record again, so that
    ``--skip-existing`` can resume it once there is room.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        os.ftruncate(fd, keep_bytes)
    finally:
        os.close(fd)
    remove_stale_temps(final_path(path))  # left by an earlier run that was killed while rewriting the file
    try:
        with path.open("a", encoding="utf-8", newline="") as handle:
            yield handle
    except OSError as exc:
        if not no_space(exc):
            raise
        with path.open("r+b") as handle:
            handle.truncate(done_inputs(path)[1])
        raise NumclipError(f"no space left while adding to {path} ({os.strerror(exc.errno)}); its complete "
                           f"records are kept: free some space and rerun with --skip-existing") from exc
