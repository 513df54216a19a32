"""The synthetic-caption filter (issue #16): the teachers' own image-caption score decides which of a reinforced
sample's synthetic captions a student distils from.

The score of a caption for a view is the mean over the K teachers of the cosine between the teacher's stored
embedding of the view and its stored embedding of the caption (the slices of the ensemble's side-by-side embeddings;
no model runs). A synthetic caption is kept when

    score(view, synthetic caption) >= score(view, ground-truth caption) - margin

that is, when the teachers find it (nearly) as good a description of the very view the student sees as the dataset's
own caption. Relative to the ground truth, so one margin serves teachers whose cosines sit at different levels; a
larger margin keeps more. A sample none of whose synthetic captions is kept trains on its ground-truth caption in
the synthetic caption batch (train/data.py's ReinforcedDecoder, which also marks each sample's `syn_kept`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def teacher_scores(image_emb: np.ndarray, text_emb: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """`[n]` float32: for one view's ensemble embedding `image_emb` `[D]` and captions `text_emb` `[n, D]`, the mean
    over the teachers (`dims`, summing to D) of the cosine between the view's slice and each caption's."""
    image = np.asarray(image_emb, dtype=np.float32)
    text = np.atleast_2d(np.asarray(text_emb, dtype=np.float32))
    if image.ndim != 1 or image.shape[0] != sum(dims) or text.shape[1] != sum(dims):
        raise ValueError(f"embedding widths {image.shape} and {text.shape} do not match the teacher dims {list(dims)}")
    bounds = np.cumsum(dims)[:-1]
    scores = np.zeros(text.shape[0], dtype=np.float32)
    for img, txt in zip(np.split(image, bounds), np.split(text, bounds, axis=1)):
        scores += txt @ img / np.maximum(np.linalg.norm(txt, axis=1) * np.linalg.norm(img), 1e-12)
    return scores / len(dims)


def kept_synthetic(image_emb: np.ndarray, text_emb: np.ndarray, syn_text_emb: np.ndarray, dims: Sequence[int],
                   margin: float) -> np.ndarray:
    """`[n_syn]` bool: which synthetic captions (`syn_text_emb` `[n_syn, D]`) the filter keeps for the view
    `image_emb` `[D]`, against the ground-truth caption `text_emb` (`[D]` or `[1, D]`)."""
    reference = teacher_scores(image_emb, text_emb, dims)[0]
    return teacher_scores(image_emb, syn_text_emb, dims) >= reference - margin
