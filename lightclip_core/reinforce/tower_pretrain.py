"""A trained teacher's image tower, first trained supervised on the training split's labels (LiT's recipe).

LiT (Zhai et al., arXiv 2111.07991) pairs a supervised-pretrained image tower, locked, with a text tower trained by
the contrastive loss. The embedded default cannot download such a tower, so the `teacher` stage makes one: the timm
trunk of a `clip` or `captioning_clip` teacher gets one linear head per label named in `pretrain_labels` (keys of the
samples' `json` metadata: the synthetic data's colour, shape, size and position), trained by the sum of their
cross-entropies on the plain training images. The heads are dropped afterwards; only the trunk is kept. The student
never sees a label: it learns from the teacher's stored embeddings and captions, as it would from a teacher
pretrained elsewhere.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lightclip_core.config import CocaTeacherConfig, ConfigError
from lightclip_core.data.reader import decode_image, decode_meta
from lightclip_core.data.shards import ShardStream, decoded, iter_raw_samples, shard_refs
from lightclip_core.data.skips import SampleError, SkipTally
from lightclip_core.data.transforms import image_transform
from lightclip_core.reinforce.teachers import IMAGE_LAYOUT
from lightclip_core.train.data import batches
from lightclip_core.train.optim import adamw
from lightclip_core.train.schedule import build_scheduler

PRETRAIN_WEIGHT_DECAY = 0.05
PRETRAIN_WARMUP = 30  # steps; then constant
NO_LABELS_HINT = ("data without these labels needs teacher.train.pretrain_steps=0 and lock_tower=false, or "
                  "pretrained teachers (teacher.ensemble, teacher.captioner)")


def label_classes(train_dir: str | os.PathLike, labels: Sequence[str], limit: int | None = None
                  ) -> dict[str, list[str]]:
    """Each label's values over the metadata of the split's first `limit` samples (all: None), sorted. A ConfigError
    naming the label when a sample lacks it (the split has no such label) or, over the whole split, it takes fewer
    than two values."""
    values: dict[str, set[str]] = {label: set() for label in labels}
    metas = decoded(iter_raw_samples(shard_refs(train_dir)), decode_meta, SkipTally())
    for meta in itertools.islice(metas, limit):
        for label in labels:
            if label not in meta:
                raise ConfigError(f"teacher pretrain_labels: {label!r} is not in the training samples' metadata "
                                  f"(keys: {sorted(meta)}); {NO_LABELS_HINT}")
            values[label].add(str(meta[label]))
    if limit is None:  # the whole split: every label must vary
        for label, seen in values.items():
            if len(seen) < 2:
                raise ConfigError(f"teacher pretrain_labels: {label!r} takes {len(seen)} value(s) in the training "
                                  "split; a label to learn needs at least two")
    return {label: sorted(seen) for label, seen in values.items()}


class LabelDecoder:
    """Raw sample -> {images, labels}: the plain image at the teacher's size and each label's class index."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str,
                 classes: dict[str, list[str]]):
        self.transform = image_transform(size, mean, std, interpolation)
        self.index = {label: {v: i for i, v in enumerate(values)} for label, values in classes.items()}

    def __call__(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        meta = decode_meta(raw)
        try:
            labels = [self.index[label][str(meta[label])] for label in self.index]
        except KeyError as err:
            raise SampleError("bad_metadata", f"label {err} missing or unseen") from None
        return {"images": self.transform(decode_image(raw)), "labels": torch.tensor(labels)}


def pretrain_tower(trunk: nn.Module, c: CocaTeacherConfig, train_dir: str | os.PathLike, mean: Sequence[float],
                   std: Sequence[float], interpolation: str, device: torch.device,
                   max_skip_fraction: float) -> dict[str, float]:
    """Train `trunk` (a timm model returning pooled features) for `c.pretrain_steps` steps on the labels; its
    figures: the loss and each label's training accuracy over the last 20 steps, the wall time, the samples skipped
    (held to `max_skip_fraction` of those read, a DataError past it)."""
    classes = label_classes(train_dir, c.pretrain_labels)
    heads = nn.ModuleList(nn.Linear(trunk.num_features, len(v)) for v in classes.values()).to(device)
    stream = ShardStream(shard_refs(train_dir), LabelDecoder(c.image_size, mean, std, interpolation, classes),
                         seed=c.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=c.batch_size, drop_last=True)
    trained = nn.ModuleList([trunk, heads])
    optimizer = adamw(trained.parameters(), lr=c.pretrain_lr, weight_decay=PRETRAIN_WEIGHT_DECAY)
    scheduler = build_scheduler(optimizer, PRETRAIN_WARMUP, c.pretrain_steps, "constant")
    trained.train()
    started = time.perf_counter()
    tail: list[tuple[float, torch.Tensor]] = []
    for _, batch in tqdm(batches(loader, stream, c.pretrain_steps), total=c.pretrain_steps, desc="tower pretraining",
                         unit="step"):
        images = batch["images"].to(device, memory_format=IMAGE_LAYOUT)
        labels = batch["labels"].to(device)
        features = trunk(images)
        logits = [head(features) for head in heads]
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        correct = torch.stack([(lg.argmax(1) == labels[:, i]).float().mean() for i, lg in enumerate(logits)])
        tail = [*tail[-19:], (loss.item(), correct.detach())]
    trunk.eval()
    stream.tally.check(max_skip_fraction, f"teacher pretraining on {train_dir}")
    accuracy = torch.stack([t[1] for t in tail]).mean(0)
    return {"pretrain/wall_time_s": time.perf_counter() - started,
            "pretrain/final_loss": sum(t[0] for t in tail) / len(tail),
            **{f"pretrain/train_accuracy/{label}": float(a) for label, a in zip(classes, accuracy)},
            **{f"pretrain/{k}": v for k, v in stream.tally.metrics().items()}}
