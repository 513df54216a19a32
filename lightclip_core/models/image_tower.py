"""Image tower: any timm backbone, giving a pooled embedding and its spatial token map."""
from __future__ import annotations

import timm
import torch
from torch import nn


class ImageTower(nn.Module):
    """A timm backbone (no classifier head) followed by average pooling and a linear projection.

    `forward` returns the L2-unnormalised embedding; `forward_tokens` also returns the last feature map flattened
    to tokens `[B, H*W, C]` for token-level objectives. `pretrained=True` loads timm's weights where they are on
    disk or reachable; the embedded default always trains from scratch.
    """

    def __init__(self, name: str, embed_dim: int, pretrained: bool = False):
        super().__init__()
        self.name = name
        self.trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
        self.num_features = self.trunk.num_features
        self.proj = nn.Linear(self.num_features, embed_dim)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk.forward_features(images)
        if fmap.ndim == 3:  # ViT-style trunks return [B, N, C]; keep the token layout
            return fmap
        return fmap.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.feature_map(images)
        return self.proj(tokens.mean(dim=1)), tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]
