"""WebDataset shards with a manifest: the one data contract between stages (DESIGN.md section 3).

A dataset directory holds `<split>-NNNNNN.tar` shards and `manifest.json`:
``{"schema_version", "split", "num_samples", "shards": [{"url", "num_samples", "sha256"}], "params",
"tasks": {name: {"label_key", "classes"}}, "skipped"}``. Shard URLs are relative to the manifest's directory,
so a dataset can be moved or cached by DVC as a whole. Shards are written under a temporary name and renamed;
the manifest is written last, so a reader that trusts the manifest never sees a partial dataset.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import webdataset as wds

from lightclip_core.infra.storage import atomic_path, join, read_versioned_json, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_FIXED_MTIME = 0.0  # shards are byte-identical for the same samples, so their sha256 is reproducible


@dataclass
class Sample:
    """One image-text pair as stored: encoded image bytes, caption and JSON metadata."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_wds(self) -> dict[str, Any]:
        return {"__key__": self.key, self.image_ext: self.image, "txt": self.caption, "json": self.meta}


class ShardSetWriter:
    """Write samples into numbered shards of a split, publishing each shard atomically, then the manifest."""

    def __init__(self, out_dir: str | os.PathLike, split: str, samples_per_shard: int):
        self.out_dir = Path(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._pending: list[Sample] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, sample: Sample) -> None:
        self._pending.append(sample)
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"{self.split}-{len(self.shards):06d}.tar"
        final = self.out_dir / name
        with atomic_path(final) as tmp:
            with open(tmp, "wb") as f:
                sink = wds.TarWriter(f, mtime=_FIXED_MTIME)
                for s in self._pending:
                    sink.write(s.as_wds())
                sink.close()
        self.shards.append({"url": name, "num_samples": len(self._pending), "sha256": sha256_file(final)})
        self._pending = []

    def close(self, params: dict[str, Any], tasks: dict[str, Any] | None = None,
              skipped: dict[str, int] | None = None) -> dict[str, Any]:
        """Flush the last shard and publish the manifest; returns the manifest."""
        self._flush()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "split": self.split,
            "num_samples": sum(s["num_samples"] for s in self.shards),
            "shards": self.shards,
            "params": params,
            "tasks": tasks or {},
            "skipped": skipped or {},
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        return manifest


def read_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    return read_versioned_json(join(str(dataset_dir), MANIFEST), "schema_version", SCHEMA_VERSION,
                               "run `lightclip prepare` first")


def describe_dataset(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a split is, in a few fields that travel with the models trained or evaluated on it (its lineage): split,
    sample and shard counts, the source that produced it, its zero-shot tasks, whether it is reinforced, and the
    digest of its shard list."""
    shards = manifest.get("shards", [])
    digest = hashlib.sha256(json.dumps([s.get("sha256") for s in shards]).encode()).hexdigest()
    return {"split": manifest.get("split"), "num_samples": manifest.get("num_samples"), "num_shards": len(shards),
            "source": (manifest.get("params") or {}).get("source"), "tasks": sorted(manifest.get("tasks") or {}),
            "reinforced": "reinforcement" in manifest, "shards_sha256": digest}


def shard_paths(dataset_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[str]:
    manifest = manifest or read_manifest(dataset_dir)
    return [str(Path(dataset_dir) / s["url"]) for s in manifest["shards"]]


def verify_shards(dataset_dir: str | os.PathLike) -> None:
    """Raise if any shard is missing or its sha256 differs from the manifest."""
    manifest = read_manifest(dataset_dir)
    for shard in manifest["shards"]:
        path = Path(dataset_dir) / shard["url"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        if sha256_file(path) != shard["sha256"]:
            raise ValueError(f"shard {path}: sha256 does not match the manifest")


def iter_raw_samples(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples (bytes per extension) from tar files, in order, without boundary markers."""
    urls = list(urls)
    if not urls:  # an empty split, or a DataLoader worker beyond the shard count; SimpleShardList rejects []
        return
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        if sample.get("__key__"):  # webdataset 1.0.x yields an empty dict at every shard boundary
            yield sample


def decode_image(raw: dict[str, Any]):
    """The PIL image of a raw sample (`jpg`, `jpeg`, `png` or `webp`), converted to RGB."""
    from PIL import Image

    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in raw:
            with Image.open(io.BytesIO(raw[ext])) as im:
                return im.convert("RGB")
    raise KeyError(f"sample {raw.get('__key__')!r} has no image (keys: {sorted(raw)})")


def decode_caption(raw: dict[str, Any]) -> str:
    """The caption (`txt`) of a raw sample as text."""
    return raw["txt"].decode("utf-8") if isinstance(raw["txt"], bytes) else raw["txt"]


def decode_meta(raw: dict[str, Any]) -> dict[str, Any]:
    return json.loads(raw["json"]) if "json" in raw else {}


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples from shards, shuffled deterministically from (seed, epoch), split across ranks and workers.

    Every epoch has one shard order: a shuffle of the shards from (seed, epoch), or with `samples_per_epoch` a
    resampled "virtual" epoch, shards drawn with replacement from (seed, epoch) until they hold that many samples
    (`sizes`, the shards' sample counts, are then needed). Rank r of a data-parallel job takes every `world_size`-th
    shard of that order and each of its DataLoader workers every n-th shard of the rank's, so a sample is read once
    per epoch across all ranks and workers (resampled epochs may draw a shard twice). A per-worker buffer shuffles
    raw samples; `decode(raw) -> item` runs inside the worker, after the shuffle. For the same seed, epoch, world
    size and worker count the order is the same on every run.

    Resuming mid-epoch: `skip[w]` raw samples are dropped (before decoding) from the start of logical worker w's
    stream, and DataLoader worker i plays logical worker (i + `worker_offset`) % n, so that a DataLoader, which asks
    its workers in turn starting from worker 0, continues with the worker whose turn it was.
    """

    def __init__(self, urls: list[str], decode: Callable[[dict[str, Any]], Any], seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
                 sizes: list[int] | None = None, samples_per_epoch: int | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if samples_per_epoch is not None and (sizes is None or len(sizes) != len(urls)):
            raise ValueError("samples_per_epoch needs the sample count of every shard (sizes)")
        self.urls = list(urls)
        self.decode = decode
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.sizes = list(sizes) if sizes is not None else None
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0
        self.skip: dict[int, int] = {}
        self.worker_offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_urls(self, epoch: int) -> list[str]:
        """The shard order of an epoch, before the split across ranks and workers."""
        if self.samples_per_epoch is not None:
            rng = random.Random(f"{self.seed}/{epoch}/resample")
            drawn: list[str] = []
            total = 0
            while total < self.samples_per_epoch and sum(self.sizes):
                i = rng.randrange(len(self.urls))
                drawn.append(self.urls[i])
                total += self.sizes[i]
            return drawn
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(urls)
        return urls

    def split(self, epoch: int, workers: int) -> list[list[list[str]]]:
        """`[rank][logical worker] -> shard urls` of an epoch (`workers`: DataLoader workers, 1 for none)."""
        order = self.epoch_urls(epoch)
        return [[order[r::self.world_size][w::workers] for w in range(workers)] for r in range(self.world_size)]

    def _my_urls(self) -> tuple[list[str], int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        logical = (worker + self.worker_offset) % workers
        return self.split(self.epoch, workers)[self.rank][logical], logical

    def _emit(self, worker: int, item: Any) -> Any:
        """What the stream yields for a decoded sample of (logical) `worker`; subclasses may tag it."""
        return item

    def __iter__(self) -> Iterator[Any]:
        urls, worker = self._my_urls()
        samples = iter_raw_samples(urls)
        if self.shuffle and self.shuffle_buffer > 1:
            # webdataset's shuffle draws only from the rng it is given, so the order is a function of the seed;
            # initial=bufsize fills the buffer before the first pick, which mixes the start as well as the rest.
            key = f"{self.seed}/{self.epoch}/{worker}" if self.world_size == 1 else \
                f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(key))(samples)
        samples = itertools.islice(samples, self.skip.get(worker, 0), None)  # resume: skip before decoding
        for raw in samples:
            yield self._emit(worker, self.decode(raw))
