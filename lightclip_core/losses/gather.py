"""Collectives for objectives that see the global batch from a data-parallel rank ("local loss, gather with grad").

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

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from lightclip_core.train.distributed import current_world


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
