"""The CLIP BPE tokenizer (open_clip's, bundled with the package: works offline)."""
from __future__ import annotations

from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

TOKENIZER_NAME = "openai-clip-bpe-49408"


@lru_cache(maxsize=8)
def get_tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | list[str], context_length: int) -> torch.Tensor:
    """`[len(texts), context_length]` int64 token ids: start, BPE tokens (truncated), end, zero padding."""
    return get_tokenizer(context_length)(texts)


def vocab_size() -> int:
    return len(get_tokenizer(77).encoder)


def special_token_ids() -> dict[str, int]:
    tok = get_tokenizer(77)
    return {"sot": tok.sot_token_id, "eot": tok.eot_token_id, "pad": 0}


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns that no sequence in the batch uses. Exact for a causal text tower pooled at the
    end-of-text token (nothing after it can reach it), and it makes short captions cheap."""
    used = int((tokens != 0).sum(dim=1).max())
    return tokens[:, :max(used, 1)]
