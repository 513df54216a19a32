"""The model and its objectives as one module: what a training step differentiates, and what DDP wraps.

Holding both as submodules lets DistributedDataParallel synchronise the objectives' own parameters (projections,
fusion blocks, heads) together with the model's. Under data parallelism each objective returns this rank's share
of every term (losses/gather.py): the mean over ranks of the returned total, and of every term, is the
single-process value on the global batch, and DDP's gradient average makes the gradients exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightclip_core.losses.base import StepContext
from lightclip_core.losses.build import forward_needs
from lightclip_core.losses.gather import global_mean


class TrainingLoss(nn.Module):
    """`forward(images, tokens, step, total_steps, extras)` -> (total loss, terms, model outputs).

    The total is the sum of every objective's `*_loss` terms times its weight: this rank's share, to backpropagate.
    `terms` holds every objective term and `loss` (the total) as floats with their global values, the mean over
    ranks of the local ones (one all-reduce per step; no collective in a job of one).
    """

    def __init__(self, model: nn.Module, objectives: nn.ModuleList):
        super().__init__()
        self.model = model
        self.objectives = objectives

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, step: int, total_steps: int,
                extras: dict[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[str, float], dict[str, Any]]:
        outputs = self.model(images, tokens, **forward_needs(self.objectives))
        ctx = StepContext(step=step, total_steps=total_steps, images=images, tokens=tokens, model=self.model,
                          extras=extras or {})
        total = images.new_zeros(())
        local: dict[str, torch.Tensor | float] = {}
        for objective in self.objectives:
            named = objective(outputs, ctx)
            total = total + objective.weight * sum(v for k, v in named.items() if k.endswith("_loss"))
            local.update(named)
        return total, global_terms({"loss": total, **local}), outputs

    def after_step(self) -> None:
        """Call after every optimizer step (an EMA copy follows the model)."""
        for objective in self.objectives:
            objective.after_step(self.model)


def global_terms(terms: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Every term as a float: the mean over ranks of this rank's values, in one all-reduce and one host copy. Every
    rank must pass the same names in the same order."""
    if not terms:
        return {}
    device = next((v.device for v in terms.values() if torch.is_tensor(v)), None)
    values = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                          else torch.tensor(float(v), dtype=torch.float64, device=device) for v in terms.values()])
    return dict(zip(terms, global_mean(values).tolist()))
