"""The training-only fusion module (LightCLIP section 1.3): a second pass of the model's own text tower in which,
after chosen transformer layers, the text attends to image-tower stage maps (text as queries). MLM reads it on
masked captions, ITM (ALBEF's image-text matching) on whole ones; when both are on they share one module, so both
objectives train the same fusion blocks. By default every block starts as an exact identity (zero-initialised output
projection), so the fused pass begins as the text tower's own (LightCLIP). ITM needs `objectives.mlm.fusion_init_std`
> 0: from the identity, an image's matched and unmatched captions reach the matching head as the same states, the
gradients of the matched and unmatched pairs cancel to first order, and the loss stays at chance (measured: 300 steps
of the embedded default). Nothing here reaches an export.
"""
from __future__ import annotations

import torch
from open_clip.transformer import LayerNorm
from torch import nn


class FusionBlock(nn.Module):
    """Text tokens attend to an image stage map: `x + out(attn(LN(x), LN(W map), LN(W map)))`; `out` starts at zero
    (an exact identity) or, with `init_std`, as BERT/ALBEF initialise their cross-attention (normal, std 0.02)."""

    def __init__(self, width: int, image_channels: int, heads: int, init_std: float = 0.0):
        super().__init__()
        self.ln_text = LayerNorm(width)
        self.image_in = nn.Linear(image_channels, width)
        self.ln_image = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        if init_std > 0:
            nn.init.normal_(self.attn.out_proj.weight, std=init_std)
        else:
            nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, text: torch.Tensor, image_map: torch.Tensor) -> torch.Tensor:
        image = self.ln_image(self.image_in(image_map.flatten(2).transpose(1, 2)))  # [B, C, H, W] -> [B, HW, width]
        return text + self.attn(self.ln_text(text), image, image, need_weights=False)[0]


class FusionBlocks(nn.ModuleList):
    """One FusionBlock per (text layer, image stride, image channels) point; `fused_pass` runs the text tower with
    them. A ModuleList, so its parameters keep the names `fusion.<i>.*` under whichever objective holds it."""

    def __init__(self, width: int, heads: int, points: list[tuple[int, int, int]], causal: bool = False,
                 init_std: float = 0.0):
        super().__init__(FusionBlock(width, channels, heads, init_std) for _, _, channels in points)
        self.points = [(layer, stride) for layer, stride, _ in points]
        self.image_strides = tuple(sorted({stride for _, stride in self.points}))
        self.causal = causal

    def fused_pass(self, text_tower: nn.Module, tokens: torch.Tensor, image_maps: dict[int, torch.Tensor],
                   replace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The final hidden states `[B, L, width]` of the text tower's pass over `tokens`, each fusion block
        attending to `image_maps[stride]` (rows paired with the tokens' rows) after its layer."""

        def fuse(layer: int, x: torch.Tensor) -> torch.Tensor:
            for (at, stride), block in zip(self.points, self):
                if at == layer:
                    x = block(x, image_maps[stride])
            return x

        _, hidden = text_tower.forward_tokens(tokens, replace=replace, after_layer=fuse if self.points else None,
                                              causal=self.causal)
        return hidden
