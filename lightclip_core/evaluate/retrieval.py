"""Image-text retrieval recall@k, with several captions per image, by three definitions, and a reference ranker:

- strict: a retrieved caption counts only if it is one of the image's own caption objects (and a retrieved image
  only if it is the caption's own image);
- text-equivalent: a retrieved caption counts if its text equals one of the image's captions, after case and
  whitespace normalisation (and a retrieved image if one of its captions equals the query's text). On data whose
  captions repeat (class-name captions, a caption grammar) strict retrieval counts an identical caption of another
  image as a miss; this one does not.
- attribute-consistent: where images have known attributes and captions name some of them (the synthetic set), a
  retrieved caption counts if every attribute it names is true of the image (and a retrieved image if every
  attribute the query caption names is true of it), whatever the words.
- the attribute oracle is not a model but a ranker that knows every image's attributes; its strict recall is the
  reference strict retrieval is read against on such data (captions with the same content cannot be told apart).

Every definition scores the same checked ranking (:func:`_ranking`): the top k candidates of every query.
Attributes are integer codes, ``[N, A]`` for the images (values >= 0) and ``[M, A]`` for the captions, where a
negative code means that the caption does not name that attribute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

Scores = Callable[[slice], torch.Tensor]  # the [q, candidates] scores of a block of queries, higher is better
def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(x).to(dtype=dtype, device="cpu")


def _topk_indices(scores: Scores, num_queries: int, k: int, chunk: int = 1024) -> torch.Tensor:
    """`[Q, k]` indices of the best-scored candidates of each query, best first."""
    # Chunked so that a large test set never materialises the whole [Q, K] similarity matrix.
    return torch.cat([scores(slice(i, i + chunk)).topk(k, dim=1).indices for i in range(0, num_queries, chunk)])


def _recalls(hits: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """`hits[q, r]` is True where the r-th ranked candidate of query q is a match: recall at every k."""
    found_within = hits.cumsum(dim=1) > 0  # [Q, kmax]: a match at rank <= r
    kmax = hits.shape[1]
    return {k: float(found_within[:, min(k, kmax) - 1].double().mean()) for k in ks}


@dataclass(frozen=True)
class _Ranking:
    """What every definition scores: caption owners, each image's best captions, each caption's best images."""

    owner: torch.Tensor  # [M] image index of every caption
    texts: torch.Tensor  # [N, k] caption indices, best first
    images: torch.Tensor  # [M, k] image indices, best first


def _ranking(image_scores: Scores, text_scores: Scores, num_images: int, num_texts: int, text_to_image: Any,
             kmax: int) -> _Ranking:
    """The checked caption owners and the `kmax` best captions of every image (by `image_scores`) and images of
    every caption (by `text_scores`), k capped at the number of candidates."""
    owner = _as_tensor(text_to_image, torch.int64)
    if owner.shape != (num_texts,) or (len(owner) and not 0 <= int(owner.min()) <= int(owner.max()) < num_images):
        raise ValueError(f"text_to_image must be {num_texts} image indices in [0, {num_images})")
    if not num_images or not num_texts:
        raise ValueError(f"retrieval needs images and texts, got {num_images} and {num_texts}")
    return _Ranking(owner, _topk_indices(image_scores, num_images, min(kmax, num_texts)),
                    _topk_indices(text_scores, num_texts, min(kmax, num_images)))


def _embedding_ranking(image_emb: Any, text_emb: Any, text_to_image: Any, kmax: int) -> _Ranking:
    """The ranking of a model: candidates by dot product of the embeddings."""
    images, texts = _as_tensor(image_emb, torch.float32), _as_tensor(text_emb, torch.float32)
    return _ranking(lambda rows: images[rows] @ texts.T, lambda rows: texts[rows] @ images.T, len(images),
                    len(texts), text_to_image, kmax)


def _strict_recalls(ranking: _Ranking, ks: Sequence[int]) -> dict[str, dict[int, float]]:
    image_ids = torch.arange(len(ranking.texts))[:, None]
    return {
        "image_to_text": _recalls(ranking.owner[ranking.texts] == image_ids, ks),
        "text_to_image": _recalls(ranking.images == ranking.owner[:, None], ks),
    }


@torch.inference_mode()
def retrieval_metrics(image_emb: Any, text_emb: Any, text_to_image: Any,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@k both ways. Image to text: a hit if ANY caption of the image ranks in the top k. Text to image: a
    hit if the caption's own image ranks in the top k. k is capped at the number of candidates."""
    return _strict_recalls(_embedding_ranking(image_emb, text_emb, text_to_image, max(ks)), ks)


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
    ranking = _embedding_ranking(image_emb, text_emb, text_to_image, max(ks))
    ids: dict[str, int] = {}
    text_id = torch.tensor([ids.setdefault(normalise_text(t), len(ids)) for t in texts], dtype=torch.int64)
    has_text = torch.zeros(len(ranking.texts), len(ids), dtype=torch.bool)  # [image, distinct text]
    has_text[ranking.owner, text_id] = True
    return {
        "image_to_text": _recalls(has_text[torch.arange(len(ranking.texts))[:, None], text_id[ranking.texts]], ks),
        "text_to_image": _recalls(has_text[ranking.images, text_id[:, None]], ks),
    }


def _attribute_codes(image_attributes: Any, text_attributes: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked `[N, A]` image and `[M, A]` caption attribute codes (see the module docstring)."""
    images, texts = _as_tensor(image_attributes, torch.int64), _as_tensor(text_attributes, torch.int64)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"attribute codes must be [images, A] and [captions, A], got {tuple(images.shape)} and "
                         f"{tuple(texts.shape)}")
    if len(images) and int(images.min()) < 0:
        raise ValueError("every attribute of every image must be known (codes >= 0)")
    return images, texts


def _consistent(image_codes: torch.Tensor, text_codes: torch.Tensor) -> torch.Tensor:
    """Whether each caption's named attributes are all true of the image; the codes broadcast against each other
    over every dimension but the last (the attributes)."""
    return ((text_codes < 0) | (text_codes == image_codes)).all(dim=-1)


@torch.inference_mode()
def attribute_consistent_retrieval(image_emb: Any, text_emb: Any, text_to_image: Any, image_attributes: Any,
                                   text_attributes: Any, ks: Sequence[int] = (1, 5, 10)
                                   ) -> dict[str, dict[int, float]]:
    """Recall@k both ways, a hit being any caption whose named attributes are all true of the query image (any
    image of which all the query caption's named attributes are true). Same ranking as :func:`retrieval_metrics`."""
    ranking = _embedding_ranking(image_emb, text_emb, text_to_image, max(ks))
    images, texts = _attribute_codes(image_attributes, text_attributes)
    if (len(images), len(texts)) != (len(ranking.texts), len(ranking.owner)):
        raise ValueError(f"attribute codes of {len(images)} images and {len(texts)} captions for "
                         f"{len(ranking.texts)} images and {len(ranking.owner)} captions")
    return {
        "image_to_text": _recalls(_consistent(images[:, None, :], texts[ranking.texts]), ks),
        "text_to_image": _recalls(_consistent(images[ranking.images], texts[:, None, :]), ks),
    }


def oracle_scores(image_attributes: Any, text_attributes: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The attribute oracle's `[N, M]` image-to-text and `[M, N]` text-to-image scores (float64, higher first).

    Image to text: a caption consistent with the image scores 1 + the number of attributes it names, any other 0.
    Text to image: an image consistent with the caption scores 1, any other 0. A uniform [0, 1) draw per pair from
    a generator seeded with `seed` is added, so equal integer scores come in a seeded random order (and the
    integer order is kept). Memory is O(N M): meant for test splits of thousands."""
    images, texts = _attribute_codes(image_attributes, text_attributes)
    consistent = torch.ones(len(images), len(texts), dtype=torch.bool)
    for a in range(images.shape[1]):  # attribute by attribute: never an [N, M, A] tensor
        consistent &= _consistent(images[:, None, a:a + 1], texts[None, :, a:a + 1])
    specificity = (texts >= 0).sum(dim=1)
    generator = torch.Generator().manual_seed(seed)
    image_to_text = torch.where(consistent, 1 + specificity, 0).double()
    image_to_text += torch.rand(image_to_text.shape, generator=generator, dtype=torch.float64)
    text_to_image = consistent.T.double() + torch.rand(len(texts), len(images), generator=generator,
                                                       dtype=torch.float64)
    return image_to_text, text_to_image


@torch.inference_mode()
def oracle_retrieval(text_to_image: Any, image_attributes: Any, text_attributes: Any,
                     ks: Sequence[int] = (1, 5, 10), seed: int = 0) -> dict[str, dict[int, float]]:
    """Strict recall@k (as :func:`retrieval_metrics` defines it) of the ranking of :func:`oracle_scores`."""
    image_to_text, text_to_image_scores = oracle_scores(image_attributes, text_attributes, seed)
    ranking = _ranking(lambda rows: image_to_text[rows], lambda rows: text_to_image_scores[rows],
                       len(image_to_text), len(text_to_image_scores), text_to_image, max(ks))
    return _strict_recalls(ranking, ks)


def recall_metrics(recalls: dict[str, dict[str, dict[int, float]]]) -> dict[str, float]:
    """Recalls by definition (metric prefix -> direction -> k -> recall) as flat metrics `<prefix>/<direction>/R@<k>`."""
    return {f"{prefix}/{direction}/R@{k}": value for prefix, result in recalls.items()
            for direction, per_k in result.items() for k, value in per_k.items()}
