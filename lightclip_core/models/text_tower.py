"""Text tower: a shortened CLIP-style causal transformer over CLIP BPE tokens (open_clip's blocks)."""
from __future__ import annotations

import torch
from open_clip.transformer import LayerNorm, Transformer
from torch import nn


class TextTower(nn.Module):
    """Token + position embedding, `layers` pre-norm residual attention blocks, final LayerNorm, projection of the
    end-of-text token. Attention is causal as in CLIP. `forward_tokens` also returns every token's final hidden
    state, for token-level objectives (callers mask out start, end and padding positions)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, heads: int, layers: int,
                 embed_dim: int, mlp_ratio: float = 4.0, eot_token_id: int | None = None):
        super().__init__()
        self.context_length = context_length
        self.eot_token_id = eot_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, batch_first=True)
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

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(tokens)]
        return pooled @ self.text_projection, x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(tokens)[0]
