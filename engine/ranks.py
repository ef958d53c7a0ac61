"""This process's place among the run's processes: rank, world size, device, barrier.

Made once per process (``init_ranks``) and handed to every stage: generation, ranking and
encoding split their prompts or rows by it, and each training stage builds its engine
(``engine/strategy.py``) on top of it. The process group outlives the stages: a training
engine is created and closed per stage, the ranks are not.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from sail.engine.config import DistributedConfig

_RANKS: "Ranks | None" = None
T = TypeVar("T")


def launched_distributed() -> bool:
    """True when started by torchrun / the deepspeed launcher (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolved_backend(dist: DistributedConfig) -> str:
    """``backend: auto`` is DeepSpeed under a distributed launcher, else local (one process)."""
    if dist.backend != "auto":
        return dist.backend
    return "deepspeed" if launched_distributed() else "local"


@dataclass(frozen=True)
class Ranks:
    """Rank, world size and device of this process, and the collectives every stage needs."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    """local (one process, no process group) or deepspeed (a torch.distributed group)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        """Processes of the run on this node: the launcher's count (torchrun: LOCAL_WORLD_SIZE,
        deepspeed: LOCAL_SIZE), else the world size (one node assumed)."""
        if self.world_size == 1:
            return 1
        for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
            if os.environ.get(key, "").isdigit():
                return int(os.environ[key])
        return self.world_size

    def barrier(self) -> None:
        # world_size 1 (``single_process()``, or one process in a group) never issues a
        # collective: a "one process" object used on rank 0 of a group would otherwise pair
        # its barrier with the other ranks' next collective and desynchronise them.
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def agreed(self, work: Callable[[], T]) -> T:
        """``work()`` on every rank, then agreement: an ``InputError`` raised on any rank is
        raised on every rank (the lowest failing rank's: its own exception there, an
        ``AgreedInputError`` with its message elsewhere), marked ``agreed``, so the job ends as
        one, never with ranks waiting at a collective for a rank that left. With several ranks,
        rank 0 prints the one line (``reported``) and every rank waits until it has, so that no
        rank's exit lets the launcher kill rank 0 before it speaks. Every rank must call it at
        the same point; nested calls are fine (an agreed error passes an outer call as is)."""
        from sail.engine.errors import AgreedInputError, InputError

        error, result = None, None
        try:
            result = work()
        except InputError as err:
            if getattr(err, "agreed", False):
                raise
            error = err
        messages = self.all_gather_object(None if error is None else str(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if not failed:
            return result
        rank, message = failed[0]
        raised = error if rank == self.rank else AgreedInputError(message, rank)
        raised.agreed = True
        if self.world_size > 1:
            if self.is_main:
                print(f"Error: {message}", file=sys.stderr, flush=True)
            raised.reported = True
            self.barrier()
        raise raised


def single_process() -> Ranks:
    """One process on the best device: no process group, barriers are no-ops."""
    return Ranks(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), "local")


def init_ranks(dist: DistributedConfig) -> Ranks:
    """The process's ``Ranks``: one process on the best device (local), or its place in the
    DeepSpeed process group, joined on the first call and the same object afterwards."""
    global _RANKS
    if resolved_backend(dist) == "local":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from sail.engine.configtree import ConfigError

            # N one-process runs would race on one run directory without a collective between them
            raise ConfigError(f"distributed.backend: local is one process, but the launcher started "
                              f"{os.environ['WORLD_SIZE']}; use deepspeed (or auto), or launch one process")
        return single_process()
    if _RANKS is None:
        _RANKS = _join_process_group()
    return _RANKS


def _join_process_group() -> Ranks:
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, default)
    import deepspeed

    on_cpu = not torch.cuda.is_available()
    if on_cpu and os.environ.get("SAIL_DS_SHM", "0") != "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at start-up: minutes
        # on a 2-core machine, and a compile killed half-way leaves a lock that hangs the
        # next start. Plain gloo is enough off the GPU; SAIL_DS_SHM=1 turns it back on.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if on_cpu else torch.device("cuda", local_rank)
    if not on_cpu:
        torch.cuda.set_device(device)
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), device, "deepspeed")
