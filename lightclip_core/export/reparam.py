"""Structural reparameterization for inference: fold every train-time multi-branch block of a model in place.

One walker serves our blocks (`lightclip_core.models.repmixer`) and timm's (MobileOne, FastViT): each foldable
block has a duck-typed `reparameterize()` method, and timm's `reparameterize_model` calls every such method
(ours included) along with timm's own `fuse()` / `switch_to_deploy()` hooks. The folded model has no BatchNorm in
those blocks and different state-dict keys, so it is built and its weights loaded before folding.
"""
from __future__ import annotations

from timm.utils import reparameterize_model
from torch import nn


class ReparameterizationError(RuntimeError):
    """The model cannot be reparameterized as it is (for example it is in training mode)."""


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_modules(model: nn.Module) -> list[str]:
    """Names of the modules in training mode (`""` for the root)."""
    return [name for name, module in model.named_modules() if module.training]


def reparameterize(model: nn.Module) -> nn.Module:
    """Fold `model` in place and return it. Refuses a model with any module in training mode: folding uses the
    BatchNorm running statistics, so a model that normalises with batch statistics would change its outputs."""
    in_training = training_modules(model)
    if in_training:
        where = f"module {in_training[0]!r}" if in_training[0] else type(model).__name__
        raise ReparameterizationError(f"cannot reparameterize a model in training mode ({where} has training=True): "
                                      "folding uses BatchNorm running statistics; call model.eval() first")
    if hasattr(model, "reparameterize"):  # timm's walker visits children only
        model.reparameterize()
    return reparameterize_model(model, inplace=True).eval()  # the folded convolutions are created in train mode
