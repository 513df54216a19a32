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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.transforms import functional as TF

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.augment import AugParams, ReplayableAugment
from lightclip_core.data.reinforced import ReinforcementError, decode_reinforcement
from lightclip_core.data.shards import (ShardStream, decode_caption, decode_image, iter_raw_samples, read_manifest,
                                        shard_paths)
from lightclip_core.data.transforms import image_transform
from lightclip_core.models.tokenizer import tokenize

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


WORKER_KEY = "_worker"  # which (logical) DataLoader worker produced a batch; the position bookkeeping reads it


class EpochStream(ShardStream):
    """A ShardStream whose decoder learns the epoch too (it is pickled into the workers at every new epoch), and
    whose samples carry the logical worker that produced them."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.decode.epoch = epoch

    def _emit(self, worker: int, item: dict[str, Any]) -> dict[str, Any]:
        return {**item, WORKER_KEY: worker}


def reinforcement_of(train_dir: str | Path) -> dict[str, Any] | None:
    """The `reinforcement` section of a split's manifest (teachers, dims, scales, sizes), None if not reinforced."""
    return read_manifest(train_dir).get("reinforcement")


def local_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per rank and micro-step: the global batch split over ranks and accumulation micro-steps. A global
    batch that does not split evenly is a ConfigError naming the field."""
    t = cfg.train
    parts = world_size * t.accum_steps
    if t.batch_size % parts:
        raise ConfigError(f"train.batch_size={t.batch_size}: not divisible by world_size * train.accum_steps = "
                          f"{world_size} * {t.accum_steps} = {parts}")
    return t.batch_size // parts


def make_loader(cfg: Config, train_dir: str | Path, rank: int = 0, world_size: int = 1,
                pin_memory: bool | None = None) -> tuple[torch.utils.data.DataLoader, EpochStream]:
    """This rank's micro-batches: reinforced ones (stored views replayed) when the distillation objective is on (the
    split must be reinforced and complete) or when the split is reinforced and `train.stored_views` is on (so plain
    CLIP sees the augmentation a distilled run sees), plain pairs otherwise. Each batch holds train.batch_size /
    (world_size * train.accum_steps) samples."""
    t = cfg.train
    if cfg.objectives.distill.enabled:
        decoder: PairDecoder = ReinforcedDecoder(cfg, require_reinforcement(train_dir))
    elif t.stored_views and reinforcement_of(train_dir) is not None:
        decoder = ReinforcedDecoder(cfg, require_reinforcement(train_dir, "train.stored_views=true"))
    else:
        decoder = PairDecoder.for_model(cfg)
    manifest = read_manifest(train_dir)
    stream = EpochStream(shard_paths(train_dir, manifest), decoder, seed=t.seed, shuffle_buffer=t.shuffle_buffer,
                         rank=rank, world_size=world_size, sizes=[s["num_samples"] for s in manifest["shards"]],
                         samples_per_epoch=t.samples_per_epoch)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=local_batch_size(cfg, world_size), num_workers=t.workers, drop_last=True,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, persistent_workers=False,
        # its own generator: making an iterator (every epoch, and on resume) leaves the global RNG untouched
        generator=torch.Generator().manual_seed(t.seed),
    )
    return loader, stream


def require_reinforcement(train_dir: str | Path, why: str = "objectives.distill.enabled=true") -> dict[str, Any]:
    """The split's reinforcement section, checked before any work: the split is reinforced and complete, and its
    first sample carries every reinforcement field at the width the manifest's teachers give. `why` names the
    setting that needs it."""
    reinforcement = reinforcement_of(train_dir)
    if reinforcement is None:
        raise ConfigError(f"{why}: {train_dir} is not a reinforced split; run "
                          f"`lightclip reinforce` on it or set objectives.distill.enabled=false")
    if not reinforcement.get("complete", False):
        raise ConfigError(f"{why}: {train_dir} is only partly reinforced "
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
            batch.pop(WORKER_KEY, None)
            yield epoch, batch
            produced += 1
            step += 1
            if step >= total_steps:
                return
        if produced == 0:
            raise RuntimeError("the training data yielded no full batch: more shards or a smaller batch are needed")
        epoch += 1


@dataclass
class DataPosition:
    """Where this rank stands in the data: the epoch, the micro-batches consumed in it (in all, and per logical
    DataLoader worker), the worker whose turn is next, and the samples consumed since the start of training."""

    epoch: int = 0
    batches: int = 0
    worker_batches: list[int] = field(default_factory=list)
    next_worker: int = 0
    samples: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "worker_batches": list(self.worker_batches),
                "next_worker": self.next_worker, "samples": self.samples}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataPosition:
        return cls(int(state["epoch"]), int(state["batches"]), [int(n) for n in state["worker_batches"]],
                   int(state["next_worker"]), int(state["samples"]))


class StepBatches:
    """This rank's micro-batches, `accum_steps` per optimizer step, epoch after epoch, from a `DataPosition`.

    Every rank takes the same number of steps per epoch (`steps_in_epoch`, computed from the manifest's shard sizes
    for the slowest rank), so that ranks stay in step; a rank's surplus micro-batches at the end of an epoch are
    dropped. The position after each step is exact: resuming from it (a new StepBatches) regenerates the epoch's
    order and skips the consumed raw samples of every worker before decoding, so the rest of the epoch is the same
    batches in the same order as without the interruption.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, stream: EpochStream, accum_steps: int,
                 position: DataPosition | None = None, samples_per_epoch: int | None = None,
                 global_batch: int | None = None):
        self.loader, self.stream, self.accum_steps = loader, stream, accum_steps
        self.workers = max(1, loader.num_workers)
        self.local_batch = int(loader.batch_size)
        self.position = position or DataPosition()
        self.samples_per_epoch, self.global_batch = samples_per_epoch, global_batch
        if not self.position.worker_batches:
            self.position.worker_batches = [0] * self.workers
        if len(self.position.worker_batches) != self.workers:
            raise ValueError(f"the data position has {len(self.position.worker_batches)} workers, the loader "
                             f"{self.workers}")
        self._iterator = None
        self._sizes = dict(zip(stream.urls, stream.sizes or []))
        self._steps: dict[int, int] = {}

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of an epoch: the fewest full micro-batches any rank gets, over `accum_steps`."""
        if epoch in self._steps:
            return self._steps[epoch]
        per_rank = [sum(sum(self._sizes[u] for u in urls) // self.local_batch for urls in rank)
                    for rank in self.stream.split(epoch, self.workers)]
        steps = min(per_rank) // self.accum_steps
        if self.samples_per_epoch is not None and self.global_batch:
            steps = min(steps, self.samples_per_epoch // self.global_batch)
        self._steps = {epoch: steps}
        return steps

    def _start_epoch(self) -> None:
        p = self.position
        self.stream.set_epoch(p.epoch)
        self.stream.skip = {w: n * self.local_batch for w, n in enumerate(p.worker_batches) if n}
        self.stream.worker_offset = p.next_worker
        if self.loader.generator is not None:  # worker seeds: a function of (seed, epoch), also after a resume
            self.loader.generator.manual_seed(self.stream.seed * 100_003 + p.epoch)
        self._iterator = iter(self.loader)

    def next_step(self) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """(epoch, the `accum_steps` micro-batches of the next optimizer step); the position then includes them."""
        p = self.position
        if p.batches >= self.steps_in_epoch(p.epoch) * self.accum_steps:
            if p.batches == 0:
                raise RuntimeError(f"epoch {p.epoch} gives no full step: the training split needs more shards or a "
                                   f"smaller train.batch_size (each rank takes whole shards)")
            self._close()
            p.epoch, p.batches, p.worker_batches, p.next_worker = p.epoch + 1, 0, [0] * self.workers, 0
        if self._iterator is None:
            self._start_epoch()
        micro = []
        for _ in range(self.accum_steps):
            batch = next(self._iterator, None)
            if batch is None:
                raise RuntimeError(f"epoch {p.epoch} ended after {p.batches} micro-batches on rank "
                                   f"{self.stream.rank}, fewer than the manifest's shard sizes give")
            worker = int(batch.pop(WORKER_KEY)[0])
            p.worker_batches[worker] += 1
            p.next_worker = (worker + 1) % self.workers
            p.batches += 1
            p.samples += self.local_batch
            micro.append(batch)
        return p.epoch, micro

    def _close(self) -> None:
        self._iterator = None  # drops the DataLoader iterator, which stops its workers
        self.stream.skip, self.stream.worker_offset = {}, 0
