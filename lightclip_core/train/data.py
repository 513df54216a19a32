"""Training batches from shards: plain image-caption pairs, or reinforced samples (MobileCLIP, DataCompDR layout).

A batch is a dict: `images` `[B, 3, S, S]`, `tokens` `[B, L]`, and for a reinforced split the extras the
distillation objective reads: `syn_tokens` (one synthetic caption per sample), `teacher_image_emb` (the teacher
ensemble's embedding of the very view the student sees), `teacher_text_emb` and `teacher_syn_text_emb`; with the
synthetic-caption filter on (`objectives.distill.synthetic_filter_margin`), also `syn_kept`: whether the sample's
synthetic caption passed it (else its ground-truth caption stands in; data/caption_filter.py).

A reinforced sample picks one of its stored augmentations and one (kept) synthetic caption from a generator keyed by
(train seed, epoch, sample key), so the choice does not depend on worker count or shuffling, and replays the stored
crop and RandAugment ops at the student's resolution (data/augment.py).

A bad sample (a damaged shard, an image that does not decode, broken reinforcement fields) never stops training: the
stream skips it, and every sample carries its worker's counts (skips.py) to the main process, where the rank's
`DataPosition` adds them up; the trainer holds their sum over the ranks to `data.max_skip_fraction`.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.transforms import functional as TF

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.augment import AugParams, ReplayableAugment
from lightclip_core.data.caption_filter import kept_synthetic
from lightclip_core.data.reinforced import ReinforcementError, decode_reinforcement
from lightclip_core.data.shards import (ShardStream, decode_caption, decode_image, decoded, iter_raw_samples,
                                        read_manifest, shard_refs)
from lightclip_core.data.skips import DataError, SkipTally
from lightclip_core.data.transforms import image_transform
from lightclip_core.models.tokenizer import tokenize

log = logging.getLogger(__name__)

EXTRA_KEYS = ("syn_tokens", "teacher_image_emb", "teacher_text_emb", "teacher_syn_text_emb", "syn_kept")
_FIRST_SAMPLES = 64  # how far require_reinforcement looks for a sample whose reinforcement decodes


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
        self.dims = [int(d) for d in reinforcement["dims"]]
        self.filter_margin = cfg.objectives.distill.synthetic_filter_margin

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
        a = rng.randrange(r.num_augmentations)
        view = self.augment.apply(decode_image(raw), AugParams.from_json(r.param_aug[a]), size=self.size,
                                  reference_size=self.reference_size)
        image, caption = TF.normalize(TF.to_tensor(view), self.mean, self.std), decode_caption(raw)
        sample = {"images": image, "tokens": tokenize(caption, self.context_length)[0],
                  "teacher_image_emb": torch.from_numpy(r.image_emb[a]),
                  "teacher_text_emb": torch.from_numpy(r.text_emb[0])}
        if self.filter_margin is None:
            candidates = range(r.num_synthetic)
        else:
            candidates = np.flatnonzero(kept_synthetic(r.image_emb[a], r.text_emb[0], r.syn_text_emb, self.dims,
                                                       self.filter_margin))
            sample["syn_kept"] = torch.tensor(len(candidates) > 0)
        if len(candidates):
            j = int(candidates[rng.randrange(len(candidates))])
            syn_caption, syn_emb = r.syn_texts[j], r.syn_text_emb[j]
        else:  # the filter kept none: the ground-truth caption stands in
            syn_caption, syn_emb = caption, r.text_emb[0]
        return {**sample, "syn_tokens": tokenize(syn_caption, self.context_length)[0],
                "teacher_syn_text_emb": torch.from_numpy(syn_emb)}


WORKER_KEY = "_worker"  # which (logical) DataLoader worker produced a batch; the position bookkeeping reads it
CONSUMED_KEY = "_consumed"  # raw samples of that worker's epoch read up to this one (skipped ones included)
SKIPS_KEY = "_skips"  # that worker's skip counts so far in this iteration (SkipTally.vector())


class EpochStream(ShardStream):
    """A ShardStream whose decoder learns the epoch too (it is pickled into the workers at every new epoch), and
    whose samples carry the logical worker that produced them, its position and its skip counts."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.decode.epoch = epoch

    def _emit(self, worker: int, item: dict[str, Any], consumed: int, counted: list[int]) -> dict[str, Any]:
        return {**item, WORKER_KEY: worker, CONSUMED_KEY: consumed, SKIPS_KEY: torch.tensor(counted)}


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
    stream = EpochStream(shard_refs(train_dir, manifest), decoder, seed=t.seed, shuffle_buffer=t.shuffle_buffer,
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
    # the first sample whose reinforcement decodes (a bad one is the stream's to skip and count); none among the
    # first few is a split without usable reinforcement: its first problem, in one line, before any work
    probe = SkipTally(verbose=False)
    raws = itertools.islice(iter_raw_samples(shard_refs(train_dir), probe), _FIRST_SAMPLES)
    first = next(decoded(raws, lambda raw: (raw["__key__"], decode_reinforcement(raw)), probe), None)
    if first is None and "bad_reinforcement" in probe.first:
        raise ReinforcementError(f"{train_dir}: no usable reinforcement in its first {probe.seen} samples; first "
                                 f"problem: {probe.first['bad_reinforcement']}")
    if first is not None:
        width, expected = first[1].dim, sum(reinforcement["dims"])
        if width != expected:
            raise ReinforcementError(f"sample {first[0]!r}: teacher embedding width {width} != {expected}, "
                                     f"the sum of the manifest's teacher dims {reinforcement['dims']}")
    return reinforcement


def batches(loader: torch.utils.data.DataLoader, stream: ShardStream, total_steps: int):
    """Yield (epoch, batch dict) until `total_steps` batches, reshuffling shards every epoch. The loader runs in this
    process (no workers), so `stream.tally` holds what was skipped."""
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
            if stream.tally.total_skipped:
                raise DataError(f"the training data yielded no full batch: {stream.tally.total_skipped} of "
                                f"{stream.tally.seen} samples skipped ({stream.tally.describe()})")
            raise RuntimeError("the training data yielded no full batch: more shards or a smaller batch are needed")
        epoch += 1


@dataclass
class DataPosition:
    """Where this rank stands in the data: the epoch, the micro-batches consumed in it (in all, and per logical
    DataLoader worker, with the samples each worker skipped in it), the worker whose turn is next, the samples
    consumed since the start of training, and what this rank skipped since then (`skips`, SkipTally.state_dict)."""

    epoch: int = 0
    batches: int = 0
    worker_batches: list[int] = field(default_factory=list)
    next_worker: int = 0
    samples: int = 0
    worker_skipped: list[int] = field(default_factory=list)
    skips: SkipTally = field(default_factory=SkipTally)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "worker_batches": list(self.worker_batches),
                "next_worker": self.next_worker, "samples": self.samples,
                "worker_skipped": list(self.worker_skipped), "skips": self.skips.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataPosition:
        workers = [int(n) for n in state["worker_batches"]]
        return cls(int(state["epoch"]), int(state["batches"]), workers, int(state["next_worker"]),
                   int(state["samples"]), [int(n) for n in state.get("worker_skipped", [0] * len(workers))],
                   SkipTally.from_state(state.get("skips")))


def ranks_skips(states: list[dict[str, Any]]) -> SkipTally:
    """The sum of every rank's skip counts, from their gathered `DataPosition.state_dict()`s."""
    total = SkipTally()
    for state in states:
        total.update(SkipTally.from_state(state.get("skips")))
    return total


class StepBatches:
    """This rank's micro-batches, `accum_steps` per optimizer step, epoch after epoch, from a `DataPosition`.

    Every rank takes the same number of steps per epoch (`steps_in_epoch`, computed from the manifest's shard sizes
    for the slowest rank), so that ranks stay in step; a rank's surplus micro-batches at the end of an epoch are
    dropped. A rank whose skipped samples leave it short of that count starts its next epoch early (its epoch number
    may then run ahead of the others'; the step count, which the ranks synchronise on, does not). The position after
    each step is exact: resuming from it (a new StepBatches) regenerates the epoch's order and skips the consumed raw
    samples of every worker (those it skipped as bad included) before decoding, so the rest of the epoch is the same
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
        if not self.position.worker_skipped:
            self.position.worker_skipped = [0] * self.workers
        if len(self.position.worker_batches) != self.workers:
            raise ValueError(f"the data position has {len(self.position.worker_batches)} workers, the loader "
                             f"{self.workers}")
        self._iterator = None
        self._counted: dict[int, list[int]] = {}  # each worker's counts already added to the position
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
        self.stream.skip = {w: n * self.local_batch + p.worker_skipped[w] for w, n in enumerate(p.worker_batches)
                            if n or p.worker_skipped[w]}
        self._counted = {}
        self.stream.worker_offset = p.next_worker
        if self.loader.generator is not None:  # worker seeds: a function of (seed, epoch), also after a resume
            self.loader.generator.manual_seed(self.stream.seed * 100_003 + p.epoch)
        self._iterator = iter(self.loader)

    def next_step(self) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """(epoch, the `accum_steps` micro-batches of the next optimizer step); the position then includes them."""
        p = self.position
        micro = []
        while len(micro) < self.accum_steps:
            if p.batches >= self.steps_in_epoch(p.epoch) * self.accum_steps:
                if p.batches == 0:
                    raise RuntimeError(f"epoch {p.epoch} gives no full step: the training split needs more shards or "
                                       f"a smaller train.batch_size (each rank takes whole shards)")
                self._next_epoch()
            if self._iterator is None:
                self._start_epoch()
            batch = next(self._iterator, None)
            if batch is None:  # skipped samples left this rank's epoch short of the manifest's sizes
                if p.batches == 0:
                    raise DataError(f"epoch {p.epoch} gives no full batch on rank {self.stream.rank}: "
                                    f"{p.skips.total_skipped} of {p.skips.seen} samples skipped so far "
                                    f"({p.skips.describe()})")
                log.info("epoch %d ended after %d micro-batches on rank %d (samples were skipped); starting the next",
                         p.epoch, p.batches, self.stream.rank)
                self._next_epoch()
                continue
            self._account(batch)
            micro.append(batch)
        return p.epoch, micro

    def _account(self, batch: dict[str, Any]) -> None:
        """Move the position past a micro-batch and add the skip counts its worker reported since its last one."""
        p = self.position
        worker = int(batch.pop(WORKER_KEY)[0])
        consumed = int(batch.pop(CONSUMED_KEY)[-1])
        counted = [int(n) for n in batch.pop(SKIPS_KEY)[-1].tolist()]
        before = self._counted.get(worker, [0] * len(counted))
        p.skips.add_vector([now - then for now, then in zip(counted, before)])
        self._counted[worker] = counted
        for reason, detail in self.stream.tally.first.items():  # details travel only without worker processes
            p.skips.first.setdefault(reason, detail)
        p.worker_batches[worker] += 1
        p.worker_skipped[worker] = consumed - p.worker_batches[worker] * self.local_batch
        p.next_worker = (worker + 1) % self.workers
        p.batches += 1
        p.samples += self.local_batch

    def _next_epoch(self) -> None:
        p = self.position
        self._close()
        p.epoch, p.batches, p.next_worker = p.epoch + 1, 0, 0
        p.worker_batches, p.worker_skipped = [0] * self.workers, [0] * self.workers

    def _close(self) -> None:
        self._iterator = None  # drops the DataLoader iterator, which stops its workers
        self.stream.skip, self.stream.worker_offset = {}, 0
