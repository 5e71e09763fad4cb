"""The process group: one process per GPU (or a few on CPU), launched by torchrun.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without them the trainer is a
single process and no process group is created at all, so a local run needs no rendezvous.

Besides the main group (nccl on GPUs, gloo on CPU) a second, gloo-only "control" group carries the
small host-side agreements (stop on SIGTERM, barriers around I/O). Being on the CPU, it never waits
for the GPU stream, so asking "did anyone get SIGTERM?" costs no device synchronisation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Long enough for local rank 0 to download a large checkpoint while the other ranks wait.
GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: Any | None = None  # the gloo group, when distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone does the I/O that must happen once: checkpoints, status, export."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums a small tensor over the ranks (evaluation counts); a no-op for one process."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Local rank 0 runs the block first (a download), then the others (a cache hit)."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def init_distributed(use_gpus: bool, group_for_one: bool = False) -> DistContext:
    """Reads torchrun's environment, picks the device and starts the process groups.

    A single process gets a (one-rank) group only when `group_for_one`: FSDP asked for
    explicitly needs one even where it shards over a single device."""
    ctx = DistContext(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
    )
    if use_gpus and torch.cuda.is_available():
        ctx.device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(ctx.device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Processes sharing a node's cores must not each start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    if ctx.distributed or (group_for_one and "MASTER_ADDR" in os.environ):
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
        ctx.control = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    return ctx


def shutdown(ctx: DistContext) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class StopAgreement:
    """Makes every rank stop at the same step after any of them got SIGTERM.

    Ranks see the signal at slightly different steps; if each stopped on its own, the others would
    block forever in the next collective. Each step starts an asynchronous MAX all-reduce of the
    local flag on the gloo group and reads the one started the step before, so the network round
    trip overlaps a whole training step and every rank reads the same answer at the same step.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.requested = False
        self._pending: Any | None = None
        self._flag = torch.zeros(1, dtype=torch.int32)

    def request(self) -> None:
        self.requested = True

    def poll(self) -> bool:
        """Called once per optimizer step by every rank; True means stop now (all ranks agree)."""
        if not self.ctx.distributed:
            return self.requested
        decided = False
        if self._pending is not None:
            self._pending.wait()
            decided = bool(self._flag.item())
        self._flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = dist.all_reduce(
            self._flag, op=dist.ReduceOp.MAX, group=self.ctx.control, async_op=True
        )
        return decided

    def drain(self) -> None:
        """Waits for the last all-reduce, so no collective is left in flight at shutdown."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
