"""WebDataset shards with a manifest: the one data contract between stages (DESIGN.md section 3).

A dataset directory holds `<split>-NNNNNN.tar` shards and `manifest.json`:
``{"schema_version", "split", "num_samples", "shards": [{"url", "num_samples", "sha256"}], "params",
"tasks": {name: {"label_key", "classes"}}, "skipped"}``. Shard URLs are relative to the manifest's directory,
so a dataset can be moved or cached by DVC as a whole, and a URL that leaves the directory (`..`, an absolute path, a
symlink to a file outside it) is refused. Shards are written under a temporary name and renamed; the manifest is
written last, so a reader that trusts the manifest never sees a partial dataset.

Reading (reader.py) never stops on bad data (a cut or garbled tar, a sample without its image, an image that does not
decode): it is skipped and counted per reason in a `SkipTally` (skips.py), which each stage holds to
`data.max_skip_fraction`. A shard's sha256 is checked against its manifest once per process; a shard that differs
has every sample validated.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds

from lightclip_core.data.reader import (CHECKSUMS, IMAGE_EXTS, REQUIRED_MEMBERS, ShardRef, decode_caption,
                                        decode_image, decode_meta, decoded, iter_raw_samples, validate_sample)
from lightclip_core.data.skips import DataError, SampleError, SkipTally
from lightclip_core.infra.storage import atomic_path, is_s3, join, read_versioned_json, sha256_file, write_json_atomic

# the reading side lives in reader.py; its names are this module's too, where the stages import them from
__all__ = ["CHECKSUMS", "IMAGE_EXTS", "MANIFEST", "REQUIRED_MEMBERS", "SCHEMA_VERSION", "Sample", "ShardRef",
           "ShardSetWriter", "ShardStream", "check_shard_url", "decode_caption", "decode_image", "decode_meta",
           "decoded", "describe_dataset", "iter_raw_samples", "read_manifest", "shard_paths", "shard_refs",
           "validate_sample", "verify_shards"]

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
    """The manifest of a dataset directory or prefix; a shard URL that would leave the dataset is a DataError."""
    path = join(str(dataset_dir), MANIFEST)
    manifest = read_versioned_json(path, "schema_version", SCHEMA_VERSION, "run `lightclip prepare` first")
    for shard in manifest.get("shards", []):
        check_shard_url(shard.get("url") if isinstance(shard, dict) else shard, path)
    return manifest


def describe_dataset(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a split is, in a few fields that travel with the models trained or evaluated on it (its lineage): split,
    sample and shard counts, the source that produced it, its zero-shot tasks, whether it is reinforced, and the
    digest of its shard list."""
    shards = manifest.get("shards", [])
    digest = hashlib.sha256(json.dumps([s.get("sha256") for s in shards]).encode()).hexdigest()
    return {"split": manifest.get("split"), "num_samples": manifest.get("num_samples"), "num_shards": len(shards),
            "source": (manifest.get("params") or {}).get("source"), "tasks": sorted(manifest.get("tasks") or {}),
            "reinforced": "reinforcement" in manifest, "shards_sha256": digest}


def check_shard_url(url: Any, where: str | os.PathLike) -> str:
    """`url` if it is a relative path below the manifest's directory (or prefix): no `..`, no absolute path, no
    scheme, no backslash; else a DataError naming the manifest. The same rule keeps local paths and S3 keys inside."""
    if (not isinstance(url, str) or not url or url.startswith("/") or "\\" in url or "\x00" in url or ":" in url
            or any(part in ("", ".", "..") for part in url.split("/"))):
        raise DataError(f"{where}: shard url {url!r} is not a relative path inside the dataset; refusing to read or "
                        "write outside it")
    return url


def shard_refs(dataset_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[ShardRef]:
    """The shards of a dataset, confined to it: a URL outside the directory, or a local shard that is a symlink to
    a file outside it, is a DataError."""
    manifest = manifest or read_manifest(dataset_dir)
    where = join(str(dataset_dir), MANIFEST)
    refs = []
    root = None if is_s3(dataset_dir) else Path(dataset_dir).resolve()
    for shard in manifest["shards"]:
        url = check_shard_url(shard.get("url"), where)
        path = join(str(dataset_dir), url)
        if root is not None and not Path(path).resolve().is_relative_to(root):
            raise DataError(f"{where}: shard {url!r} resolves to {Path(path).resolve()}, outside the dataset "
                            f"directory {root}; refusing to read it")
        refs.append(ShardRef(path, shard.get("num_samples"), shard.get("sha256")))
    return refs


def shard_paths(dataset_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[str]:
    return [ref.path for ref in shard_refs(dataset_dir, manifest)]


def verify_shards(dataset_dir: str | os.PathLike) -> None:
    """Raise if any shard is missing or its sha256 differs from the manifest."""
    for ref in shard_refs(dataset_dir):
        if not Path(ref.path).is_file():
            raise FileNotFoundError(f"shard {ref.path} listed in the manifest is missing")
        if sha256_file(ref.path) != ref.sha256:
            raise ValueError(f"shard {ref.path}: sha256 does not match the manifest")


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples from shards, shuffled deterministically from (seed, epoch), split across ranks and workers.

    Every epoch has one shard order: a shuffle of the shards from (seed, epoch), or with `samples_per_epoch` a
    resampled "virtual" epoch, shards drawn with replacement from (seed, epoch) until they hold that many samples
    (`sizes`, the shards' sample counts, are then needed). Rank r of a data-parallel job takes every `world_size`-th
    shard of that order and each of its DataLoader workers every n-th shard of the rank's, so a sample is read once
    per epoch across all ranks and workers (resampled epochs may draw a shard twice). A per-worker buffer shuffles
    raw samples; `decode(raw) -> item` runs inside the worker, after the shuffle, and a sample it refuses
    (SampleError) is skipped and counted in `tally`, as the reader counts damaged shards. For the same seed, epoch,
    world size and worker count the order is the same on every run.

    Resuming mid-epoch: `skip[w]` raw samples are dropped (before decoding) from the start of logical worker w's
    stream, and DataLoader worker i plays logical worker (i + `worker_offset`) % n, so that a DataLoader, which asks
    its workers in turn starting from worker 0, continues with the worker whose turn it was.
    """

    def __init__(self, urls: list[str | ShardRef], decode: Callable[[dict[str, Any]], Any], seed: int = 0,
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
        self.tally = SkipTally()  # what this process's iterations skipped (a DataLoader worker fills its own copy)

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

    def _emit(self, worker: int, item: Any, consumed: int, counted: list[int]) -> Any:
        """What the stream yields for a decoded sample of (logical) `worker`; subclasses may tag it with `consumed`
        (raw samples of the worker's epoch read so far, the resume position) and `counted` (the tally's counts
        since this iteration began, `SkipTally.vector()`)."""
        return item

    def __iter__(self) -> Iterator[Any]:
        urls, worker = self._my_urls()
        samples = iter_raw_samples(urls, self.tally)
        if self.shuffle and self.shuffle_buffer > 1:
            # webdataset's shuffle draws only from the rng it is given, so the order is a function of the seed;
            # initial=bufsize fills the buffer before the first pick, which mixes the start as well as the rest.
            key = f"{self.seed}/{self.epoch}/{worker}" if self.world_size == 1 else \
                f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(key))(samples)
        skip = self.skip.get(worker, 0)
        # counts are reported from the resume point on: what was counted before it is in the resumed position
        base = self.tally.vector()
        for index, raw in enumerate(samples):
            if index < skip:  # resume: skip before decoding
                base = self.tally.vector()
                continue
            try:
                item = self.decode(raw)
            except SampleError as err:  # one bad sample never stops a stream: skipped, counted
                self.tally.skip(err.reason, detail=f"sample {raw.get('__key__')!r} of {raw.get('__url__')}: {err}")
                continue
            yield self._emit(worker, item, index + 1, [a - b for a, b in zip(self.tally.vector(), base)])
