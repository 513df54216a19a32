"""Where this process stands in a data-parallel job: rank, world size, device, and the process group.

`torchrun` (and a Kubeflow Trainer TrainJob, which runs torchrun on every node) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Without them the process is a job of one and nothing here touches torch.distributed.
The backend is NCCL on GPUs and gloo on CPU.

Collectives for objectives that see the global batch ("local loss, gather with grad"):
Every rank holds b samples; the global batch is the concatenation of the ranks' batches in rank order, so this
rank's rows are `row_offset(b) .. row_offset(b) + b`. An objective computes the loss of its own rows against the
columns of every rank: `gather_with_grad` keeps the autograd graph, and its backward sums the gradients that every
rank's rows send to this rank's slice (exact gradients, memory linear in the batch). Objectives normalise their local
loss so that the mean over ranks equals the single-process loss on the global batch: that is what DDP's gradient
average (a sum divided by the world size) needs. Every rank must call these functions in the same order with
tensors of the same shape (the ranks' local batches are equal). In a job of one they are identities and issue no
collective.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> World:
    """The job's shape as torchrun describes it in the environment (a job of one when it does not)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from None


def current_world() -> World:
    """The initialised process group's shape, or a job of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def device_for(world: World) -> torch.device:
    """This rank's device: its local GPU when there is one, the CPU otherwise."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_from_env(timeout_s: float = 600.0) -> World:
    """Join the process group torchrun describes (no-op for a job of one, or when already joined). A rank that
    cannot reach the others fails after `timeout_s` instead of hanging."""
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        return current_world() if dist.is_initialized() else world
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current_world()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` in a job of one."""
    world = current_world()
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not current_world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------- collectives of the objectives

def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """The ranks' `t` concatenated along dim 0 in rank order; gradients flow back to every rank's own slice."""
    if not current_world().distributed:
        return t
    return torch.cat(dist_nn.all_gather(t), dim=0)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """The ranks' `t` concatenated along dim 0 in rank order, detached (teacher embeddings, EMA features). In a job
    of one, `t` itself when it needs no gradient (so that callers can tell the whole batch by identity)."""
    t = t.detach() if t.requires_grad else t
    world = current_world()
    if not world.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(world.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def global_sum(x: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
    """The sum over ranks of `x` (a count or a value), detached; a tensor on `x`'s device (or `device`)."""
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64, device=device)
    if current_world().distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_mean(x: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
    """The mean over ranks of `x`, detached: a term whose local values are rank shares gives its global value."""
    return global_sum(x, device) / current_world().world_size


def row_offset(local_batch: int) -> int:
    """Where this rank's rows start in the global batch (every rank holds `local_batch` rows)."""
    return current_world().rank * int(local_batch)
