"""Labelled training data: folder-per-label, CSV/TSV ``path,label``, or OrdinalCLIP lists ``<path> <label>``.

Every distinct problem (label outside the task's bins, unreadable row, missing file) is reported once, with the first
file and line where it occurs and how many rows share it.
Images that fail to decode during training are skipped and counted, never replaced by another image.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from numclip_cli.errors import DataError
from numclip_cli.images import ImageLoadError, load_rgb
from numclip_cli.inputs import UnreadableFolder, scan_directory
from numclip_cli.tasks import TaskSpec
from numclip_cli.textfiles import MAX_DATA_LIST_BYTES, read_text_file

_MAX_REPORTED = 5
_LINE_END = re.compile(r"\r\n|\r|\n")  # the line ends of universal newlines, and no others


def derived_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th epoch or image of a run seeded ``seed``: distinct per index, and within the
    int64 torch takes for every seed up to 2**63 - 1 (identical to seed * 1_000_003 + index below that)."""
    return (seed * 1_000_003 + index) % (1 << 63)


@dataclass
class Samples:
    """Image paths with their labels in the task unit."""

    paths: list[str]
    values: list[float]
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int], source: str) -> Samples:
        """The samples at ``indices``."""
        return Samples([self.paths[i] for i in indices], [self.values[i] for i in indices], source)


def load_samples(data: str | Path, task: TaskSpec) -> Samples:
    """Read a dataset in any supported layout; raise ``DataError`` listing the first problems."""
    path = Path(data)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_dir():
        rows = _folder_rows(path)
    else:  # anything else must be a regular file of bounded size: read_text_file says what it is otherwise
        text = read_text_file(path, MAX_DATA_LIST_BYTES, "data list", DataError)
        rows = _table_rows(path, text) if path.suffix.lower() in (".csv", ".tsv") else _list_rows(path, text)
    # one entry per distinct problem (a folder named by a bad label is one problem, not one per image):
    # reason -> [how many rows have it, the first place it occurs]
    problems: dict[str, list] = {}
    paths, values = [], []
    for where, image, label in rows:
        if isinstance(image, UnreadableFolder):  # its images would silently be missing from the data
            problems.setdefault(image.reason, [0, str(image)])[0] += 1
            continue
        try:
            value = task.parse_label(label)
        except ValueError as exc:
            problems.setdefault(str(exc), [0, where])[0] += 1
            continue
        if not os.path.exists(image):
            problems.setdefault("image not found", [0, f"{where}: {image}"])[0] += 1
            continue
        paths.append(image)
        values.append(value)
    if problems:
        raise DataError(_problem_report(path, problems))
    if not paths:
        raise DataError(f"no labelled images found in {path}")
    return Samples(paths, values, str(path))


def _problem_report(path: Path, problems: dict[str, list]) -> str:
    """One line: how many rows are unusable, then each distinct problem once with its first place and count."""
    total = sum(count for count, _ in problems.values())
    shown = [f"{place}: {reason}" + (f" (and {count - 1} more like it)" if count > 1 else "")
             for reason, (count, place) in list(problems.items())[:_MAX_REPORTED]]
    more = f"; and {len(problems) - _MAX_REPORTED} other problem(s)" if len(problems) > _MAX_REPORTED else ""
    return f"{total} problem(s) in {path}: " + "; ".join(shown) + more


def _folder_rows(root: Path) -> list[tuple[str, str, str]]:
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        raise DataError(f"cannot read folder {root}: {exc.strerror or exc}") from None
    rows = []
    for sub in subs:  # the image is its own place: an example file
        rows.extend((image, image, sub.name) for image in scan_directory(str(sub), recursive=True))
    return rows


def _table_rows(path: Path, text: str) -> list[tuple[str, str, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
    # the csv module splits the lines itself: a quoted field may hold a newline, and only \r and \n end a line
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "path" not in fields or "label" not in fields:
        raise DataError(f"{path}:1: expected a header with 'path' and 'label' columns, got {reader.fieldnames}")
    rows = []
    for row in reader:
        row = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
        rows.append((f"{path}:{reader.line_num}", str(path.parent / row["path"].strip()), row["label"]))
    return rows


def _list_rows(path: Path, content: str) -> list[tuple[str, str, str]]:
    rows = []
    # universal newlines only (str.splitlines would also split a name at U+2028, NEL or a form feed)
    for line, text in enumerate(_LINE_END.split(content), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        parts = text.rstrip().rsplit(None, 1)  # the label is the last field: paths may contain spaces
        if len(parts) != 2:
            rows.append((f"{path}:{line}", "", text))  # reported as an unreadable label below
            continue
        rows.append((f"{path}:{line}", str(path.parent / parts[0].strip()), parts[1]))
    return rows


def split_validation(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """A seeded random split into (train, validation)."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be between 0 and 1, got {fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(order) * fraction))
    if cut >= len(order):
        raise DataError(f"{len(order)} image(s) are too few to hold out a validation split")
    return (samples.subset(sorted(order[cut:]), samples.source),
            samples.subset(sorted(order[:cut]), f"{samples.source} (validation split)"))


class LabelledImages(Dataset):
    """(image tensor, value, bin index) per sample; an unreadable image yields ``None`` to be skipped."""

    def __init__(self, samples: Samples, task: TaskSpec, transform: Callable, augment_seed: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.augment_seed = augment_seed  # random augmentation seeded per (epoch, sample): same in any process
        self.bins = [task.bin_index(v) for v in samples.values]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, int] | None:
        try:
            image = load_rgb(self.samples.paths[index])
        except ImageLoadError:
            return None
        if self.augment_seed is None:
            return self.transform(image), self.samples.values[index], self.bins[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.augment_seed, index))
            return self.transform(image), self.samples.values[index], self.bins[index]


def collate_labelled(items: list) -> dict[str, torch.Tensor] | None:
    """Stack the readable samples; count the skipped ones."""
    ok = [item for item in items if item is not None]
    skipped = len(items) - len(ok)
    if not ok:
        return {"skipped": torch.tensor(skipped)}
    return {"images": torch.stack([i[0] for i in ok]),
            "values": torch.tensor([i[1] for i in ok], dtype=torch.float32),
            "bins": torch.tensor([i[2] for i in ok], dtype=torch.long),
            "skipped": torch.tensor(skipped)}


def train_transform(preprocess_cfg: dict, augment: bool = True) -> Callable:
    """Training preprocessing with the geometry of ``predict``'s: open_clip's evaluation transform for the same
    config, with its centre crop made random and a horizontal flip added.

    The zoom is the one the model sees at prediction time (shortest side resized to the input size); the crop
    only slides along the longer side, so square images are augmented by the flip alone. The NumCLIP reference
    crops 224 from 256 for training *and* evaluation; numclip evaluates with open_clip's resize-to-224 centre
    crop, so training resizes to 224 as well instead of zooming 14 % further in. ``augment=False`` gives
    exactly the evaluation transform.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision import transforms

    known = PreprocessCfg.__dataclass_fields__
    cfg = PreprocessCfg(**{key: value for key, value in preprocess_cfg.items() if key in known})
    steps = list(image_transform_v2(cfg, is_train=False).transforms)
    if augment:
        # a flip commutes with the resize and the centred crop or pad of every resize mode, so it can go first
        steps = [transforms.RandomHorizontalFlip(),
                 *(transforms.RandomCrop(step.size) if isinstance(step, transforms.CenterCrop) else step
                   for step in steps)]
    return transforms.Compose(steps)


def few_shot(samples: Samples, task: TaskSpec, shots: int, seed: int) -> tuple[Samples, Samples, list[str]]:
    """``shots`` images per rank (per bin for ``ranks = "bins"`` tasks), drawn at random with ``seed``.

    Returns the drawn images, the rest (untouched, in their order: validation comes from there) and the names of
    the ranks that had fewer images than ``shots`` (all of theirs are drawn).
    """
    if shots < 1:
        raise DataError(f"--shots must be at least 1, got {shots}")
    if not task.rank_values():
        raise DataError(f"task {task.name!r} has no integer in its range to draw shots per rank: "
                        f"set ranks = \"bins\" in its spec to draw them per bin")
    by_rank: dict[int, list[int]] = {}
    for index, value in enumerate(samples.values):
        by_rank.setdefault(task.rank_index(value), []).append(index)
    rng = random.Random(seed)
    drawn: list[int] = []
    for rank in sorted(by_rank):
        drawn.extend(rng.sample(by_rank[rank], min(shots, len(by_rank[rank]))))
    names = task.rank_names()
    short = [names[rank] for rank in range(len(names)) if len(by_rank.get(rank, ())) < shots]
    taken = set(drawn)
    return (samples.subset(sorted(drawn), f"{samples.source} ({shots} per rank)"),
            samples.subset([i for i in range(len(samples)) if i not in taken], samples.source), short)
