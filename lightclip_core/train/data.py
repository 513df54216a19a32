"""Training batches from shards: plain image-caption pairs, or reinforced samples (MobileCLIP, DataCompDR layout).

A batch is a dict: `images` `[B, 3, S, S]`, `tokens` `[B, L]`, and for a reinforced split the extras the
distillation objective reads: `syn_tokens` (one synthetic caption per sample), `teacher_image_emb` (the teacher
ensemble's embedding of the very view the student sees), `teacher_text_emb` and `teacher_syn_text_emb`.

A reinforced sample picks one of its stored augmentations and one synthetic caption from a generator keyed by
(train seed, epoch, sample key), so the choice does not depend on worker count or shuffling, and replays the stored
crop and RandAugment ops at the student's resolution (data/augment.py).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.transforms import functional as TF

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.augment import AugParams, ReplayableAugment
from lightclip_core.data.reinforced import ReinforcementError, decode_reinforcement
from lightclip_core.data.shards import (ShardStream, decode_caption, decode_image, iter_raw_samples, read_manifest,
                                         shard_paths)
from lightclip_core.data.tokenizer import tokenize
from lightclip_core.data.transforms import image_transform

EXTRA_KEYS = ("syn_tokens", "teacher_image_emb", "teacher_text_emb", "teacher_syn_text_emb")


class PairDecoder:
    """Raw WebDataset sample -> {images, tokens}; runs in DataLoader workers."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str,
                 context_length: int):
        self.size, self.mean, self.std, self.interpolation = size, list(mean), list(std), interpolation
        self.transform = image_transform(size, mean, std, interpolation)
        self.context_length = context_length
        self.epoch = 0

    @classmethod
    def for_model(cls, cfg: Config) -> PairDecoder:
        """The decoder of the student `cfg.model` trains (its image size, normalisation and context length)."""
        img = cfg.model.image
        return cls(img.size, img.mean, img.std, img.interpolation, cfg.model.text.context_length)

    def __call__(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"images": self.transform(decode_image(raw)),
                "tokens": tokenize(decode_caption(raw), self.context_length)[0]}


class ReinforcedDecoder(PairDecoder):
    """Raw reinforced sample -> {images, tokens, syn_tokens, teacher_*_emb}: a stored view replayed at the student's
    size, the ground-truth caption, one synthetic caption, and the teacher embeddings that belong to them."""

    def __init__(self, cfg: Config, reinforcement: dict[str, Any]):
        img = cfg.model.image
        super().__init__(img.size, img.mean, img.std, img.interpolation, cfg.model.text.context_length)
        self.reference_size = int(reinforcement["image_size"])
        self.width = int(sum(reinforcement["dims"]))
        self.augment = ReplayableAugment(self.size, interpolation=self.interpolation)
        self.seed = cfg.train.seed

    def _rng(self, key: str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}/{self.epoch}/{key}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def __call__(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        key = raw.get("__key__", "?")
        r = decode_reinforcement(raw)
        if r.dim != self.width:
            raise ReinforcementError(f"sample {key!r}: teacher embedding width {r.dim} != {self.width}, the sum of the "
                             f"manifest's teacher dims")
        rng = self._rng(key)
        a, j = rng.randrange(r.num_augmentations), rng.randrange(r.num_synthetic)
        view = self.augment.apply(decode_image(raw), AugParams.from_json(r.param_aug[a]), size=self.size,
                                  reference_size=self.reference_size)
        image = TF.normalize(TF.to_tensor(view), self.mean, self.std)
        return {
            "images": image,
            "tokens": tokenize(decode_caption(raw), self.context_length)[0],
            "syn_tokens": tokenize(r.syn_texts[j], self.context_length)[0],
            "teacher_image_emb": torch.from_numpy(r.image_emb[a]),
            "teacher_text_emb": torch.from_numpy(r.text_emb[0]),
            "teacher_syn_text_emb": torch.from_numpy(r.syn_text_emb[j]),
        }


class EpochStream(ShardStream):
    """A ShardStream whose decoder learns the epoch too (it is pickled into the workers at every new epoch)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.decode.epoch = epoch


def reinforcement_of(train_dir: str | Path) -> dict[str, Any] | None:
    """The `reinforcement` section of a split's manifest (teachers, dims, scales, sizes), None if not reinforced."""
    return read_manifest(train_dir).get("reinforcement")


def make_loader(cfg: Config, train_dir: str | Path) -> tuple[torch.utils.data.DataLoader, ShardStream]:
    """Batches for training: reinforced ones when the distillation objective is on (the split must be
    reinforced and complete), plain pairs otherwise."""
    t = cfg.train
    if cfg.objectives.distill.enabled:
        decoder: PairDecoder = ReinforcedDecoder(cfg, require_reinforcement(train_dir))
    else:
        decoder = PairDecoder.for_model(cfg)
    stream = EpochStream(shard_paths(train_dir), decoder, seed=t.seed, shuffle_buffer=t.shuffle_buffer)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=t.batch_size, num_workers=t.workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
    return loader, stream


def require_reinforcement(train_dir: str | Path) -> dict[str, Any]:
    """The split's reinforcement section, checked before any work: the split is reinforced and complete, and its
    first sample carries every reinforcement field at the width the manifest's teachers give."""
    reinforcement = reinforcement_of(train_dir)
    if reinforcement is None:
        raise ConfigError(f"objectives.distill.enabled=true: {train_dir} is not a reinforced split; run "
                          f"`lightclip reinforce` on it or set objectives.distill.enabled=false")
    if not reinforcement.get("complete", False):
        raise ConfigError(f"objectives.distill.enabled=true: {train_dir} is only partly reinforced "
                          f"({reinforcement.get('missing_shards')} shards missing); rerun `lightclip reinforce`")
    first = next(iter_raw_samples(shard_paths(train_dir)[:1]), None)
    if first is not None:
        width, expected = decode_reinforcement(first).dim, sum(reinforcement["dims"])
        if width != expected:
            raise ReinforcementError(f"sample {first['__key__']!r}: teacher embedding width {width} != {expected}, "
                                     f"the sum of the manifest's teacher dims {reinforcement['dims']}")
    return reinforcement


def batches(loader: torch.utils.data.DataLoader, stream: ShardStream, total_steps: int):
    """Yield (epoch, batch dict) until `total_steps` batches, reshuffling shards every epoch."""
    step, epoch = 0, 0
    while step < total_steps:
        stream.set_epoch(epoch)
        produced = 0
        for batch in loader:
            yield epoch, batch
            produced += 1
            step += 1
            if step >= total_steps:
                return
        if produced == 0:
            raise RuntimeError("the training data yielded no full batch: more shards or a smaller batch are needed")
        epoch += 1
