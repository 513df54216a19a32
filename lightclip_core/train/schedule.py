"""Learning-rate schedule: linear warmup, then cosine decay to zero or a constant rate."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """The multiplier of the base learning rate at `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str = "cosine"):
    """Every parameter group's own learning rate times the same multiplier."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda s: warmup_cosine(s, warmup_steps, total_steps, schedule))
