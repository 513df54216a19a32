"""The objective API: every training objective is a module that returns named terms.

A term whose name ends in `_loss` is a loss; the trainer multiplies it by the objective's `weight` (params.yaml),
sums, and logs every term, losses unweighted. Other terms are diagnostics (floats or 0-d tensors), logged as they
are. An objective declares what it needs from the model's forward pass (`image_strides`, `needs_text_hidden`); its
own parameters (projections, fusion blocks, heads) live in the objective, never in the model, so that nothing of
them reaches an export.

Data parallel (infra/distributed.py, losses/objective.py): on each rank an objective returns this rank's share of
every term, such that the mean over ranks is the single-process value on the global batch; DDP's gradient average
then gives exact gradients. Batch-level objectives (contrastive, distill) gather features from every rank; per-sample
ones (token, mlm) stay local and normalise by global counts. Every rank returns the same term names, whatever its
data, and reaches the same collectives in the same order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn


def keyed_generator(*key: object) -> torch.Generator:
    """A host generator seeded by its key alone (e.g. seed, global step, global sample index), never by the rank, the
    batch position or what ran before: the draws of an objective replay exactly on resume and in any world size."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass
class StepContext:
    """What an objective may read besides the model outputs: the batch, the model and where training stands."""

    step: int  # 0-based global step being computed
    total_steps: int
    images: torch.Tensor
    tokens: torch.Tensor
    model: nn.Module
    # what the data carries besides images and captions, e.g. a reinforced dataset's teacher embeddings and
    # synthetic captions (keys: train/data.py EXTRA_KEYS); empty for plain shards
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    name: str = "objective"
    image_strides: tuple[int, ...] = ()
    needs_text_hidden: bool = False

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to update an EMA copy)."""
