"""Work shared between the processes of one launch (``accelerate launch`` / ``torchrun``): which share of
the samples a process handles, and gathering the shares back in order.

Evaluation is sharded by sample index: process r of W takes the contiguous block
``[r·n/W, (r+1)·n/W)`` of the n samples, and the blocks are concatenated in rank order, so the gathered
result lists sample 0 … n−1 exactly as one process would. Everything a sample depends on (its initial noise,
its label or prompt) is a function of its index, never of the process (:func:`deme.sampling.initial_noise`,
:func:`deme.sd.initial_latents`), so one process and W processes give the same samples.

    accelerate launch -m deme compare --profile cifar10 --n 50000      # 8 GPUs: each samples 6,250
    python -m deme compare --profile cifar10 --n 50000                 # the same numbers, one process

Without a launcher (a notebook, a plain ``python``) :func:`current_processes` is one process of one and
every method here is the identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class Processes:
    """This process's place among the ``world`` processes of a launch (``rank`` 0 is the main one)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None      # this process's accelerator (None: the caller's default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> range:
        """The indices of the ``n`` items this process handles: a contiguous block; the blocks of ranks
        0 … W−1, in that order, are 0 … n−1."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def gather(self, part: list) -> list:
        """Every process's ``part`` (a list), concatenated in rank order, on every process."""
        if not self.distributed:
            return list(part)
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, list(part))
        return [x for p in parts for x in p]

    def concat(self, part: np.ndarray) -> np.ndarray:
        """Every process's array (rows of its share) concatenated along the first axis in rank order."""
        if not self.distributed:
            return part
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, np.asarray(part))
        return np.concatenate(parts)

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (what the others pass is ignored)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. writes a cache), the others after it (and read it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = Processes()
"""One process of one: shares are everything, gathers are the identity."""


def current_processes() -> Processes:
    """The processes of this launch: from a running process group (e.g. the training loop's Accelerator
    started it); else, under a launcher that set ``WORLD_SIZE`` > 1, from accelerate's ``PartialState``, which
    starts the group (NCCL on GPUs; gloo on CPUs: with ``ACCELERATE_USE_CPU=1``, ``accelerate launch --cpu``,
    or where there is no GPU); else :data:`SINGLE`. Under a launcher every process must make the same calls
    (gathers are collective)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif launched > 1:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
        rank, world = state.process_index, state.num_processes
    else:
        return SINGLE
    if world != launched:
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but the process group has {world}; on "
                           "CPUs set ACCELERATE_USE_CPU=1 or launch with `accelerate launch --cpu --num_processes N`")
    if world == 1:
        return SINGLE
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return Processes(rank, world, device)
