"""AdamW in its fused form where the parameters allow it.

torch's default AdamW on CPU tensors is the single-tensor loop, which allocates temporaries of every parameter's size
each step (for the 49408 x 256 token embedding, 50 MB each) and walks each tensor several times; the fused kernel
(CPU and CUDA, torch >= 2.4) updates each parameter in one pass. Same algorithm, same state dict (a checkpoint of
either form resumes in the other); the results agree to float rounding (tests/test_optim.py).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")


def _params(groups: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for g in groups:
        out += list(g["params"]) if isinstance(g, dict) else [g]
    return out


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` (tensors or parameter groups), fused when every parameter is a floating-point
    tensor on the CPU or a CUDA device."""
    groups = list(params)
    tensors = _params(groups)
    fused = bool(tensors) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, fused=fused, **kwargs)
