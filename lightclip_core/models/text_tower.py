"""Text towers over CLIP BPE tokens: a shortened CLIP-style transformer (open_clip's blocks) and MobileCLIP's MCt,
the same transformer between two RepMixer blocks (1 x k depthwise convolutional token mixing)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

from lightclip_core.models.config import TextConfig
from lightclip_core.models.repmixer import RepMixerBlock


class TextTower(nn.Module):
    """Token + position embedding, `layers` pre-norm residual attention blocks, final LayerNorm, projection of the
    end-of-text token. Attention is causal as in CLIP, or bidirectional over the real tokens (`causal=False`, as
    in MobileCLIP). With `mixer_kernel` set this is MCt: a RepMixer block before and after the transformer.
    `forward_tokens` also returns every token's final hidden state, for token-level objectives (callers mask out
    start, end and padding positions). Nothing after the end-of-text token reaches the embedding, in any variant
    (in training mode, MCt's BatchNorms still count the zeroed padding in their batch statistics)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, heads: int, layers: int,
                 embed_dim: int, mlp_ratio: float = 4.0, eot_token_id: int | None = None, causal: bool = True,
                 mixer_kernel: int | None = None):
        super().__init__()
        self.context_length = context_length
        self.eot_token_id = eot_token_id
        self.heads = heads
        self.causal = causal
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.mixer_in = RepMixerBlock(width, (1, mixer_kernel), mlp_ratio) if mixer_kernel else None
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, batch_first=True)
        self.mixer_out = RepMixerBlock(width, (1, mixer_kernel), mlp_ratio) if mixer_kernel else None
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", self._causal_mask(context_length), persistent=False)
        self.init_parameters()

    @staticmethod
    def _causal_mask(n: int) -> torch.Tensor:
        return torch.full((n, n), float("-inf")).triu_(1)

    def init_parameters(self) -> None:
        """CLIP's initialisation (Radford et al. 2021), scaled by width and depth."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eot_token_id is None:
            return tokens.argmax(dim=-1)  # CLIP's BPE gives the end-of-text token the largest id
        return (tokens == self.eot_token_id).int().argmax(dim=-1)

    def padding_mask(self, tokens: torch.Tensor, eot: torch.Tensor, causal: bool) -> torch.Tensor | None:
        """`[B, L]` True up to and including end-of-text; None where causal attention alone hides the padding.
        Positions, not token ids, mark padding: id 0 (the padding value) is also the BPE token "!"."""
        if causal and self.mixer_in is None:
            return None
        return torch.arange(tokens.shape[1], device=tokens.device) <= eot[:, None]

    def attention_mask(self, real: torch.Tensor | None, n: int, causal: bool) -> torch.Tensor:
        """Causal `[L, L]`, or an additive key-padding mask `[B * heads, L, L]` for bidirectional attention."""
        if causal:
            return self.attn_mask[:n, :n]
        blocked = torch.zeros(real.shape, dtype=self.positional_embedding.dtype, device=real.device)
        blocked = blocked.masked_fill(~real, float("-inf"))
        return blocked[:, None, None, :].expand(-1, self.heads, n, -1).reshape(-1, n, n)

    @staticmethod
    def _mix(block: RepMixerBlock, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # [B, L, C] -> [B, C, 1, L]: the sequence as a one-row map for the 1 x k depthwise convolutions
        grid = x.transpose(1, 2).unsqueeze(2)
        return block(grid, real[:, None, None, :].to(x.dtype)).squeeze(2).transpose(1, 2)

    def forward_tokens(self, tokens: torch.Tensor, *, replace: tuple[torch.Tensor, torch.Tensor] | None = None,
                       after_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                       causal: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding, final hidden states `[B, L, width]`). The keywords serve training-only passes (MLM):
        `replace=(where [B, L] bool, row [width])` puts `row` in place of those tokens' embeddings (a mask token
        outside the vocabulary), `after_layer(i, x)` runs after transformer layer i (fusion), `causal` overrides
        the tower's attention."""
        causal = self.causal if causal is None else causal
        n = tokens.shape[1]
        eot = self.eot_positions(tokens)
        real = self.padding_mask(tokens, eot, causal)
        if replace is None:
            x = self.token_embedding(tokens)
        else:  # a second pass over the same table: a sparse gradient spares a second dense [vocab, width] buffer
            x = F.embedding(tokens, self.token_embedding.weight, sparse=True)
            where, row = replace
            x = torch.where(where[..., None], row.to(x.dtype), x)
        x = x + self.positional_embedding[:n]
        if self.mixer_in is not None:
            x = self._mix(self.mixer_in, x, real)
        mask = self.attention_mask(real, n, causal)
        checkpointed = self.training and getattr(self.transformer, "grad_checkpointing", False)
        for i, block in enumerate(self.transformer.resblocks):
            if checkpointed:  # CLIP.set_grad_checkpointing: recompute the block in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            if after_layer is not None:
                x = after_layer(i, x)
        if self.mixer_out is not None:
            x = self._mix(self.mixer_out, x, real)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.text_projection, x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(tokens)[0]


def build_text_tower(cfg: TextConfig, embed_dim: int, vocab_size: int, eot_token_id: int | None) -> TextTower:
    """The text tower described by `model.text`."""
    return TextTower(vocab_size, cfg.context_length, cfg.width, cfg.heads, cfg.layers, embed_dim,
                     mlp_ratio=cfg.mlp_ratio, eot_token_id=eot_token_id, causal=cfg.causal,
                     mixer_kernel=cfg.mixer_kernel if cfg.kind == "mct" else None)
