"""Multi-process training with ``torch.distributed`` (``torchrun --nproc_per_node N -m numclip_cli train ...``).

Each rank decodes its share of every global batch; image features are all-gathered *with gradients* so the
losses (the KL text→image term needs the whole batch) are computed on the global batch exactly as a single
process would, and DDP averages the gradients. Because ``all_gather``'s backward sums the identical gradients of
every rank (×world) and DDP divides by world, the update equals the single-process update of the same global
batch. gloo on CPU, nccl on CUDA; rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and talks to the user."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or an equivalent launcher) set the rendezvous environment for several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a single process otherwise."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def gather(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order; differentiable for tensors that need grad.

    Ranks may hold different counts (a skipped unreadable image): each pads to the largest count and the
    padding is cut out again after the exchange.
    """
    if not world.distributed:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.nn.functional.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, max(sizes) - tensor.shape[0]])
    if tensor.requires_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world.size)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)


def mean_across(value: float, world: World) -> float:
    """The mean of a per-rank number over all ranks."""
    if not world.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / world.size


def barrier(world: World) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if world.distributed:
        dist.barrier()


class EpochOrder(Sampler[int]):
    """A seeded permutation per epoch, split round-robin over ranks.

    With per-rank batch b, the union of the ranks' j-th batches is exactly positions [j·b·W, (j+1)·b·W) of the
    permutation: the single-process j-th batch of size b·W. (When the data size is not a multiple of W the last
    samples are dropped from the distributed run, so exact equality needs a multiple of the global batch.)
    """

    def __init__(self, size: int, seed: int, world: World, shuffle: bool = True) -> None:
        self.size, self.seed, self.world, self.shuffle = size, seed, world, shuffle

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        usable = len(order) - len(order) % self.world.size if self.world.distributed else len(order)
        return iter(order[self.world.rank:usable:self.world.size])

    def __len__(self) -> int:
        return self.size // self.world.size if self.world.distributed else self.size
