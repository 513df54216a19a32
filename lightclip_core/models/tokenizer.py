"""The CLIP BPE tokenizer (open_clip's, bundled with the package: works offline)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

TOKENIZER_NAME = "openai-clip-bpe-49408"


@lru_cache(maxsize=8)
def get_tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | list[str], context_length: int) -> torch.Tensor:
    """`[len(texts), context_length]` int64 token ids: start, BPE tokens (truncated), end, zero padding."""
    return get_tokenizer(context_length)(texts)


def vocab_file() -> Path:
    """The BPE merges file (gzip) that defines the vocabulary."""
    return Path(default_bpe())


def tokenizer_from_file(path: str | os.PathLike, context_length: int) -> SimpleTokenizer:
    """The same tokenizer built from a copy of the vocabulary file (as shipped in an export directory)."""
    return SimpleTokenizer(bpe_path=str(path), context_length=context_length)


def tokenizer_spec(context_length: int) -> dict[str, Any]:
    """Everything a consumer needs to reproduce :func:`tokenize` (recorded in export metadata)."""
    tok = get_tokenizer(context_length)
    return {
        "name": TOKENIZER_NAME,
        "implementation": "open_clip.tokenizer.SimpleTokenizer",
        "context_length": context_length,
        "vocab_size": len(tok.encoder),
        "sot_token_id": tok.sot_token_id,
        "eot_token_id": tok.eot_token_id,
        "pad_token_id": 0,
        "clean": "lower",  # ftfy fix, HTML unescape, whitespace collapse, lower case
        "layout": "start, BPE tokens, end-of-text, zero padding; over-long texts are cut and end with end-of-text",
    }


def vocab_size() -> int:
    return len(get_tokenizer(77).encoder)


def special_token_ids() -> dict[str, int]:
    tok = get_tokenizer(77)
    return {"sot": tok.sot_token_id, "eot": tok.eot_token_id, "pad": 0}


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns that no sequence in the batch uses. Exact for a causal text tower pooled at the
    end-of-text token (nothing after it can reach it), and it makes short captions cheap."""
    # the length is where end-of-text sits, not a count of non-zero ids: id 0 is also a real BPE token ("!")
    eot = get_tokenizer(77).eot_token_id
    used = int((tokens == eot).int().argmax(dim=1).max()) + 1
    return tokens[:, :used]


def word_mask(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, L]` True at the caption's own tokens: after start-of-text, before end-of-text (never padding)."""
    eot = get_tokenizer(77).eot_token_id
    end = (tokens == eot).int().argmax(dim=1, keepdim=True)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    return (positions > 0) & (positions < end)
