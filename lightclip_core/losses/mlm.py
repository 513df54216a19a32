"""Masked language modelling enhanced by multi-level image-text fusion (LightCLIP section 1.3), training only.

A second pass of the model's own text tower reads the masked caption; after chosen transformer layers a fusion
block lets the text attend to an image-tower stage map (text as queries). Every fusion block starts as an exact
identity (zero-initialised output projection). The head is dense + GELU + LayerNorm + a decoder tied to the token
embedding. The mask token is a learned row kept here, outside the vocabulary, so the exported model never sees it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from torch import nn

from lightclip_core.data.tokenizer import special_token_ids, word_mask
from lightclip_core.losses.base import Objective, StepContext

MASK_ROW, RANDOM_TOKEN = 0.8, 0.1  # BERT's 80/10/10: mask row / random token / unchanged


def mask_tokens(tokens: torch.Tensor, words: torch.Tensor, prob: float,
                num_regular_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose `prob` of the word positions; of those 80% take the mask row, 10% a random regular token, 10% stay.

    Returns (input ids, where the mask row goes, chosen positions = the prediction targets). Random tokens are drawn
    from ids below `num_regular_tokens`, so that start/end-of-text ids never appear in the middle of a caption.
    """
    chosen = (torch.rand(tokens.shape, device=tokens.device) < prob) & words
    roll = torch.rand(tokens.shape, device=tokens.device)
    use_mask_row = chosen & (roll < MASK_ROW)
    randomise = chosen & (roll >= MASK_ROW) & (roll < MASK_ROW + RANDOM_TOKEN)
    random_ids = torch.randint(0, num_regular_tokens, tokens.shape, device=tokens.device)
    return torch.where(randomise, random_ids, tokens), use_mask_row, chosen


class FusionBlock(nn.Module):
    """Text tokens attend to an image stage map: `x + out(attn(LN(x), LN(W map), LN(W map)))`, out zero-initialised."""

    def __init__(self, width: int, image_channels: int, heads: int):
        super().__init__()
        self.ln_text = LayerNorm(width)
        self.image_in = nn.Linear(image_channels, width)
        self.ln_image = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, text: torch.Tensor, image_map: torch.Tensor) -> torch.Tensor:
        image = self.ln_image(self.image_in(image_map.flatten(2).transpose(1, 2)))  # [B, C, H, W] -> [B, HW, width]
        return text + self.attn(self.ln_text(text), image, image, need_weights=False)[0]


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then logits over the vocabulary with the token embedding as the decoder."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), token_embedding, self.bias)


class MaskedLanguageObjective(Objective):
    """`mlm_loss`: cross-entropy at the masked positions only, predicted from the fused second text pass."""

    name = "mlm"

    def __init__(self, width: int, heads: int, vocab_size: int, fusion: list[tuple[int, int, int]],
                 mask_prob: float = 0.15, causal: bool = False, batch_fraction: float = 1.0, weight: float = 1.0):
        """`fusion`: (text layer, image stride, image channels) per block; empty for MLM without fusion.
        `batch_fraction`: the masked pass reads only the first ceil(fraction * B) pairs of the (shuffled) batch,
        which bounds its cost (a second text pass) on text-heavy models."""
        super().__init__(weight)
        self.mask_prob, self.batch_fraction = mask_prob, batch_fraction
        self.causal = causal
        self.num_regular_tokens = min(special_token_ids()["sot"], special_token_ids()["eot"])
        self.fusion_points = [(layer, stride) for layer, stride, _ in fusion]
        self.image_strides = tuple(sorted({stride for _, stride, _ in fusion}))
        self.fusion = nn.ModuleList(FusionBlock(width, channels, heads) for _, _, channels in fusion)
        self.mask_embedding = nn.Parameter(torch.empty(width).normal_(std=0.02))
        self.head = MLMHead(width, vocab_size)

    def forward(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        text = ctx.model.text
        n = math.ceil(self.batch_fraction * ctx.tokens.shape[0])
        tokens = ctx.tokens[:n]
        inputs, use_mask_row, chosen = mask_tokens(tokens, word_mask(tokens), self.mask_prob, self.num_regular_tokens)
        maps = {stride: fmap[:n] for stride, fmap in outputs.get("image_maps", {}).items()}

        def fuse(layer: int, x: torch.Tensor) -> torch.Tensor:
            for (at, stride), block in zip(self.fusion_points, self.fusion):
                if at == layer:
                    x = block(x, maps[stride])
            return x

        _, hidden = text.forward_tokens(inputs, replace=(use_mask_row, self.mask_embedding),
                                        after_layer=fuse if self.fusion_points else None, causal=self.causal)
        if not bool(chosen.any()):
            return {"mlm_loss": hidden.sum() * 0.0, "mlm_masked": 0.0}
        logits = self.head(hidden[chosen], text.token_embedding.weight)
        targets = tokens[chosen]
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return {"mlm_loss": loss, "mlm_accuracy": accuracy.detach(), "mlm_masked": float(chosen.sum())}
