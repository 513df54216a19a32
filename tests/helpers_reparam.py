"""Shared by the reparameterization tests: statistics that make folding mistakes visible."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, and every layer scale values of
    order one (their 1e-5 initialisation would hide any error in the branches they scale)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(like.shape, generator=gen) * (high - low) + low

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(draw(module.running_var, 0.5, 2.0))
            module.weight.copy_(draw(module.weight, 0.8, 1.2))
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    for name, param in model.named_parameters():
        if "layer_scale" in name or name.endswith(".gamma"):  # ours, and timm's LayerScale2d
            param.copy_(draw(param, 0.5, 1.5))
    return model
