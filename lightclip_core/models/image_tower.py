"""Image tower: any timm backbone, giving a pooled embedding and its spatial token map."""
from __future__ import annotations

import timm
import torch
from torch import nn


class ImageTower(nn.Module):
    """A timm backbone (no classifier head) followed by average pooling and a linear projection.

    `forward` returns the L2-unnormalised embedding; `forward_tokens` also returns the last feature map flattened
    to tokens `[B, H*W, C]`; `forward_maps` returns the embedding and the stage maps `[B, C, H, W]` at the asked
    strides (timm's `feature_info`), for the training-only token and fusion objectives. `pretrained=True` loads
    timm's weights where they are on disk or reachable; the embedded default always trains from scratch.
    `output_stride` (16 or 8) dilates the last stages instead of striding them (timm's `output_stride`).
    """

    def __init__(self, name: str, embed_dim: int, pretrained: bool = False, output_stride: int | None = None):
        super().__init__()
        self.name = name
        extra = {} if output_stride is None else {"output_stride": output_stride}
        self.trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="", **extra)
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

    def stage_index(self, stride: int) -> int:
        """The last `feature_info` stage with this reduction; ValueError naming the strides there are."""
        found = [i for i, info in enumerate(self.trunk.feature_info) if info["reduction"] == stride]
        if not found:
            strides = sorted({info["reduction"] for info in self.trunk.feature_info})
            raise ValueError(f"image tower {self.name} has no stage at stride {stride}; it has {strides}")
        return found[-1]

    def stage_channels(self, stride: int) -> int:
        return self.trunk.feature_info[self.stage_index(stride)]["num_chs"]

    def forward_maps(self, images: torch.Tensor, strides: tuple[int, ...]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(embedding, {stride: stage map}) in one pass of the trunk."""
        indices = sorted({self.stage_index(s) for s in strides})
        final, maps = self.trunk.forward_intermediates(images, indices=indices)
        by_index = dict(zip(indices, maps))
        if final.ndim == 3:  # ViT-style trunks: pool the token layout as `feature_map` does
            pooled = final.mean(dim=1)
        else:
            pooled = final.flatten(2).mean(dim=2)
        return self.proj(pooled), {s: by_index[self.stage_index(s)] for s in strides}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]
