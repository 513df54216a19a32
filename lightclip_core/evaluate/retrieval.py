"""Image-text retrieval recall@k, with several captions per image, by two definitions:

- strict: a retrieved caption counts only if it is one of the image's own caption objects (and a retrieved image
  only if it is the caption's own image);
- text-equivalent: a retrieved caption counts if its text equals one of the image's captions, after case and
  whitespace normalisation (and a retrieved image if one of its captions equals the query's text). On data whose
  captions repeat (class-name captions, a caption grammar) strict retrieval counts an identical caption of another
  image as a miss; this one does not.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(x).to(dtype=dtype, device="cpu")


def _topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """`[Q, k]` indices of the keys most similar (dot product) to each query, best first."""
    # Chunked so that a large test set never materialises the whole [Q, K] similarity matrix.
    return torch.cat([(queries[i:i + chunk] @ keys.T).topk(k, dim=1).indices for i in range(0, len(queries), chunk)])


def _recalls(hits: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """`hits[q, r]` is True where the r-th ranked candidate of query q is a match: recall at every k."""
    found_within = hits.cumsum(dim=1) > 0  # [Q, kmax]: a match at rank <= r
    kmax = hits.shape[1]
    return {k: float(found_within[:, min(k, kmax) - 1].double().mean()) for k in ks}


def _ranked(image_emb: Any, text_emb: Any, text_to_image: Any, kmax: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked caption owners, each image's `kmax` best captions and each caption's `kmax` best images (k capped
    at the number of candidates): the ranking both definitions score."""
    images, texts = _as_tensor(image_emb, torch.float32), _as_tensor(text_emb, torch.float32)
    owner = _as_tensor(text_to_image, torch.int64)
    if owner.shape != (len(texts),) or (len(owner) and not 0 <= int(owner.min()) <= int(owner.max()) < len(images)):
        raise ValueError(f"text_to_image must be {len(texts)} image indices in [0, {len(images)})")
    if not len(images) or not len(texts):
        raise ValueError(f"retrieval needs images and texts, got {len(images)} and {len(texts)}")
    ranked_texts = _topk_indices(images, texts, min(kmax, len(texts)))
    ranked_images = _topk_indices(texts, images, min(kmax, len(images)))
    return owner, ranked_texts, ranked_images


@torch.inference_mode()
def retrieval_metrics(image_emb: Any, text_emb: Any, text_to_image: Any,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@k both ways. Image to text: a hit if ANY caption of the image ranks in the top k. Text to image: a
    hit if the caption's own image ranks in the top k. k is capped at the number of candidates."""
    owner, ranked_texts, ranked_images = _ranked(image_emb, text_emb, text_to_image, max(ks))
    image_ids = torch.arange(len(ranked_texts))[:, None]
    return {
        "image_to_text": _recalls(owner[ranked_texts] == image_ids, ks),
        "text_to_image": _recalls(ranked_images == owner[:, None], ks),
    }


def normalise_text(text: str) -> str:
    """Case and whitespace normalisation: what "the same caption" means for text-equivalent retrieval."""
    return " ".join(text.lower().split())


@torch.inference_mode()
def text_equivalent_retrieval(image_emb: Any, text_emb: Any, texts: Sequence[str], text_to_image: Any,
                              ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@k both ways, a hit being any caption (image) whose text equals one of the image's captions (the
    query's text), after :func:`normalise_text`. Same queries, candidates and ranking as :func:`retrieval_metrics`."""
    if len(texts) != len(text_emb):
        raise ValueError(f"{len(texts)} caption texts for {len(text_emb)} caption embeddings")
    owner, ranked_texts, ranked_images = _ranked(image_emb, text_emb, text_to_image, max(ks))
    ids: dict[str, int] = {}
    text_id = torch.tensor([ids.setdefault(normalise_text(t), len(ids)) for t in texts], dtype=torch.int64)
    has_text = torch.zeros(len(ranked_texts), len(ids), dtype=torch.bool)  # [image, distinct text]
    has_text[owner, text_id] = True
    return {
        "image_to_text": _recalls(has_text[torch.arange(len(ranked_texts))[:, None], text_id[ranked_texts]], ks),
        "text_to_image": _recalls(has_text[ranked_images, text_id[:, None]], ks),
    }
