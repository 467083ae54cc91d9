"""Decoding images for the model: a ``Dataset`` of preprocessed views per path (errors kept per input), batches
in input order from DataLoader workers, and how many decode workers to start."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from numclip_cli.errors import one_line
from numclip_cli.images import ImageLoadError, load_rgb
from numclip_cli.inputs import UnreadableFolder

# an upright image → its views (the image itself, or face crops) with the fields each adds to its record
Crops = Callable[[Any], list[tuple[Any, dict[str, Any]]]]


class ImageFiles(Dataset):
    """Paths → preprocessed views (the image, or its face crops); a file that cannot be used yields its error."""

    def __init__(self, paths: Sequence[str], transform: Callable, crops: Crops | None = None) -> None:
        self.paths = paths
        self.transform = transform
        self.crops = crops  # runs here, so face detection happens in the decode workers

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str, list[dict[str, Any]]]:
        if isinstance(self.paths[index], UnreadableFolder):
            return index, None, self.paths[index].reason, []
        try:
            image = load_rgb(self.paths[index])
            views = self.crops(image) if self.crops else [(image, {})]
            return index, torch.stack([self.transform(view) for view, _ in views]), "", [f for _, f in views]
        except ImageLoadError as exc:
            return index, None, str(exc), []
        except Exception as exc:  # a transform failing on an odd image must not stop the run
            return index, None, f"cannot preprocess image: {one_line(exc)}", []


@dataclass
class Batch:
    """Decoded images of one batch and the errors of the inputs that failed."""

    indices: list[int]
    images: torch.Tensor | None  # stacked views of the inputs that decoded, in order
    errors: dict[int, str]
    fields: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # per decoded input: its views' fields


def collate(items: list[tuple[int, torch.Tensor | None, str, list[dict[str, Any]]]]) -> Batch:
    """Concatenate the views of the decoded images, keep the errors by input index."""
    ok = [tensor for _, tensor, _, _ in items if tensor is not None]
    return Batch(indices=[i for i, *_ in items], images=torch.cat(ok) if ok else None,
                 errors={i: err for i, tensor, err, _ in items if tensor is None},
                 fields={i: fields for i, tensor, _, fields in items if tensor is not None})


def ignore_ctrl_c(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a decode worker ignores the Ctrl-C a terminal sends to the process group.

    The main process stops the run at a safe point and then shuts its workers down; a worker that quit first
    could break the hand-over of a batch. SIGTERM stays torch's: the main process ends stuck workers with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_died(exc: BaseException) -> bool:
    """Whether ``exc`` is the DataLoader's report that a decode worker process died (killed, crashed)."""
    # torch has no exception type for it: a RuntimeError with this message, from its iterator or SIGCHLD handler;
    # a worker killed while handing a batch over breaks the shared-memory connection instead
    if isinstance(exc, ConnectionResetError | EOFError):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid")


def batches(paths: Sequence[str], transform: Callable, batch_size: int, workers: int,
            pin_memory: bool = False, crops: Crops | None = None) -> Iterator[Batch]:
    """Decoded batches in input order; workers decode ahead while the model computes."""
    loader = DataLoader(ImageFiles(paths, transform, crops), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory, prefetch_factor=2 if workers else None,
                        persistent_workers=False, worker_init_fn=ignore_ctrl_c)
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        # stop the workers and unregister them now, not whenever the iterator is collected: torch's SIGCHLD
        # handler would otherwise raise about a dead worker at a random later point (e.g. during exit)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            # workers killed by a signal to the process group make torch's SIGCHLD handler raise here: they are
            # gone either way, and the run's outcome was already decided by the caller
            with contextlib.suppress(Exception):
                shutdown()


# Starting workers (0.1-0.3 s measured: each forks the process holding the model) costs more than decoding this
# many images in the main process, whatever the batch size.
FEW_INPUTS = 16


def default_workers(num_inputs: int, batch_size: int, device_type: str = "cpu") -> int:
    """Decode processes: none for a handful of images, up to 4 feeding an accelerator, at most one on a CPU."""
    import os

    cores = os.cpu_count() or 1
    if num_inputs <= max(batch_size, FEW_INPUTS):
        return 0
    if device_type != "cpu":
        return max(1, min(4, cores))
    # on CPU the model's threads already use every core; measured on 2 cores (README, Performance): with workers
    # numclip-tiny runs 14-23 % slower and ViT-B-16 no faster, so only a larger CPU gets one worker for pipelining
    return 1 if cores > 2 else 0
