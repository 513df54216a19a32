"""Batched embedding of images and texts by an exported model: what the test split and the benchmark sets share."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lightclip_core.export.load import ExportedModel


@torch.inference_mode()
def embed_images(exported: ExportedModel, images: Iterable, batch_size: int) -> torch.Tensor:
    """`[N, D]` embeddings of PIL images, preprocessed as exported, in order, `batch_size` at a time (on the CPU);
    an empty tensor when there are none. `images` may be a generator that records what comes with each image."""
    chunks, pending = [], []
    for image in images:
        pending.append(exported.preprocess(image))
        if len(pending) == batch_size:
            chunks.append(exported.model.encode_image(torch.stack(pending).to(exported.device)).cpu())
            pending = []
    if pending:
        chunks.append(exported.model.encode_image(torch.stack(pending).to(exported.device)).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.inference_mode()
def embed_texts(exported: ExportedModel, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """`[M, D]` embeddings of texts, tokenised as exported, `batch_size` at a time (on the CPU)."""
    return torch.cat([exported.model.encode_text(exported.tokenize(list(texts[i:i + batch_size])).to(exported.device))
                      .cpu() for i in range(0, len(texts), batch_size)])
