"""RepMixer: FastViT's structurally reparameterizable depthwise token mixer, written once for any kernel shape.

A `k x k` kernel mixes an image map `[B, C, H, W]`; a `1 x k` kernel mixes a token sequence laid out as
`[B, C, 1, L]` (MobileCLIP's MCt text tower). Training uses parallel branches (conv-BN, 1x1 conv-BN, identity-BN);
`reparameterize()` folds them into one depthwise convolution by RepVGG algebra (in eval mode only: the fold uses
the BatchNorm running statistics).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

KernelSize = int | tuple[int, int]


def _kernel(kernel_size: KernelSize) -> tuple[int, int]:
    kernel = tuple(to_2tuple(kernel_size))
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"token-mixing kernels must have odd sides to keep the map size, got {kernel}")
    return kernel


def depthwise_conv(dim: int, kernel: tuple[int, int], bias: bool) -> nn.Conv2d:
    """A same-size depthwise convolution."""
    return nn.Conv2d(dim, dim, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=dim, bias=bias)


def conv_bn(dim: int, kernel: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=depthwise_conv(dim, kernel, bias=False), bn=nn.BatchNorm2d(dim)))


def identity_kernel(dim: int, kernel: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """The depthwise kernel `[dim, 1, kh, kw]` whose convolution is the identity."""
    eye = torch.zeros(dim, 1, *kernel, dtype=like.dtype, device=like.device)
    eye[:, 0, kernel[0] // 2, kernel[1] // 2] = 1.0
    return eye


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, bias)` of the convolution equal to `bn(conv(x, kernel))` with the running statistics."""
    weight, bias = fuse_conv_bn_weights(kernel, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return weight.detach(), bias.detach()


def pad_kernel(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a centred kernel to `size` (a 1x1 scale branch joins a k x k kernel)."""
    dh, dw = size[0] - kernel.shape[-2], size[1] - kernel.shape[-1]
    return F.pad(kernel, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


class RepMixer(nn.Module):
    """`x + layer_scale * (mixer(x) - norm(x))` with `mixer` = conv-BN + 1x1 conv-BN + identity-BN and `norm` =
    identity-BN, all depthwise (FastViT's MetaFormer mixing). Folds into one depthwise convolution with bias."""

    def __init__(self, dim: int, kernel_size: KernelSize = 3, layer_scale_init: float = 1e-5,
                 scale_branch: bool = True):
        super().__init__()
        self.dim, self.kernel_size = dim, _kernel(kernel_size)
        self.conv = conv_bn(dim, self.kernel_size)
        self.scale = conv_bn(dim, (1, 1)) if scale_branch and self.kernel_size != (1, 1) else None
        self.identity = nn.BatchNorm2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale_init)))  # 1-D: no weight decay
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        mixed = self.conv(x) + self.identity(x) - self.norm(x)
        if self.scale is not None:
            mixed = mixed + self.scale(x)
        return x + self.layer_scale.view(-1, 1, 1) * mixed

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every branch, the residual and the layer scale into `reparam_conv` (idempotent)."""
        if self.reparam_conv is not None:
            return
        eye = identity_kernel(self.dim, self.kernel_size, self.conv.conv.weight)
        branches = [fold_bn(self.conv.conv.weight, self.conv.bn), fold_bn(eye, self.identity)]
        if self.scale is not None:
            weight, bias = fold_bn(self.scale.conv.weight, self.scale.bn)
            branches.append((pad_kernel(weight, self.kernel_size), bias))
        norm_weight, norm_bias = fold_bn(eye, self.norm)
        gamma = self.layer_scale
        weight = eye + gamma.view(-1, 1, 1, 1) * (sum(w for w, _ in branches) - norm_weight)
        bias = gamma * (sum(b for _, b in branches) - norm_bias)
        fused = depthwise_conv(self.dim, self.kernel_size, bias=True).to(weight)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        del self.conv, self.scale, self.identity, self.norm, self.layer_scale
        self.reparam_conv = fused


class ConvFFN(nn.Module):
    """Depthwise conv-BN (local mixing), then a pointwise MLP (1x1 convolutions) with GELU. The conv-BN folds."""

    def __init__(self, dim: int, kernel_size: KernelSize = 3, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.conv: nn.Module = conv_bn(dim, _kernel(kernel_size))
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for conv in (self.conv.conv, self.fc1, self.fc2):  # FastViT's initialisation of its ConvMlp
            trunc_normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into the depthwise convolution (idempotent)."""
        if isinstance(self.conv, nn.Sequential):
            self.conv = fuse_conv_bn_eval(self.conv.conv, self.conv.bn)


class RepMixerBlock(nn.Module):
    """A MetaFormer block: RepMixer token mixing, then `x + layer_scale * ConvFFN(x)`.

    `mask` (broadcastable to the input, 1 = real position, 0 = padding) zeroes padded positions before every
    convolution, so that the real positions never see padding and give the same result at any padded length.
    Padded positions of the output are left unspecified.
    """

    def __init__(self, dim: int, kernel_size: KernelSize = 3, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-5):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init=layer_scale_init)
        self.mlp = ConvFFN(dim, kernel_size, mlp_ratio)
        self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_mixer(x if mask is None else x * mask)
        y = self.mlp(x if mask is None else x * mask)
        return x + (y if self.layer_scale is None else self.layer_scale.view(-1, 1, 1) * y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the layer scale into the last pointwise convolution (idempotent); the children fold themselves."""
        if self.layer_scale is None:
            return
        self.mlp.fc2.weight.mul_(self.layer_scale.view(-1, 1, 1, 1))
        self.mlp.fc2.bias.mul_(self.layer_scale)
        self.layer_scale = None
