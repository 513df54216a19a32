"""The reinforce stage (MobileCLIP, METHOD.md 2.1): for every shard of a split, N replayable augmentations, the
teacher ensemble's embeddings of each view, synthetic captions and the teachers' text embeddings, written in the
DataCompDR layout (`paug.json`, `syn.json`, `npz`) next to the original members.

The stage works shard by shard. A shard is written under a temporary name and renamed, then its entry file
(`.entries/<shard>.json`: sample count, sha256, skipped samples, fingerprint, the teacher specs and the run's
reinforcement description) is written; the manifest is rebuilt from the entries last. A shard whose entry carries the current fingerprint
(parameters, teachers, source sha256) and whose file is still the one recorded is skipped, so a rerun after a crash
redoes only what is missing, and a `shard_range` lets several workers (the Kubeflow fan-out) reinforce disjoint shard
groups of one split.

Source and output may be `s3://` prefixes. A source shard is then downloaded (and checked against the manifest's
sha256) just before it is reinforced; a reinforced shard is written locally, uploaded, and only then is its entry
written, which also records the object's size and ETag (the intactness check on S3, instead of re-hashing). There is
no file lock on S3: fan-out workers run with `publish=False` and one join step calls `publish_reinforced`, which
needs no teacher weights (the entries carry what the manifest records about the teachers).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from lightclip_core.config import Config, ConfigError, TeacherSpec
from lightclip_core.data.augment import ReplayableAugment, sample_generator
from lightclip_core.data.reinforced import encode_reinforcement
from lightclip_core.data.shards import (MANIFEST, SCHEMA_VERSION, ShardRef, decode_caption, decode_image,
                                        iter_raw_samples, read_manifest)
from lightclip_core.data.skips import SampleError, SkipTally
from lightclip_core.infra import storage
from lightclip_core.infra.sink import MetricSink
from lightclip_core.infra.storage import atomic_path, is_s3, join, sha256_file, write_json_atomic
from lightclip_core.reinforce.captioner import Captioner
from lightclip_core.reinforce.coca_teacher import trained_captioner
from lightclip_core.reinforce.teachers import TeacherEnsemble

log = logging.getLogger(__name__)

ENTRIES = ".entries"
_FIXED_MTIME = 0.0


@dataclass
class ReinforceResult:
    out_dir: Path | str  # a str for an s3:// prefix
    shards_written: int
    shards_reused: int
    samples: int
    skipped: dict[str, int]
    complete: bool | None  # None when the manifest was not published (publish=False)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Timer:
    """Seconds spent in teacher and captioner forward passes versus everything (decode, augment, write)."""

    teacher_s: float = 0.0

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.teacher_s += time.perf_counter() - start


def default_specs(cfg: Config, teacher_dir: str | Path | None) -> tuple[list[TeacherSpec], TeacherSpec]:
    """The ensemble and captioner of params.yaml; where empty, the teachers the `teacher` stage trained (the teacher
    `model/`, `second/` when teacher.second is set, and the captioner: `model/` itself for a CoCa, `captioner/` for a
    captioning CLIP)."""
    trained = TeacherSpec(model=f"local-dir:{join(teacher_dir, 'model')}") if teacher_dir else None
    second = [TeacherSpec(model=f"local-dir:{join(teacher_dir, 'second')}")] if teacher_dir and cfg.teacher.second \
        else []
    ensemble = list(cfg.teacher.ensemble) or ([trained, *second] if trained else [])
    captioner_dir = trained_captioner(cfg.teacher.train.kind)
    trained_captioner_spec = TeacherSpec(model=f"local-dir:{join(teacher_dir, captioner_dir)}") \
        if teacher_dir and captioner_dir else None
    captioner = cfg.teacher.captioner or trained_captioner_spec
    if not ensemble or captioner is None:
        raise ConfigError("teacher.ensemble/teacher.captioner: empty, and no --teacher directory of trained "
                          "teachers was given")
    return ensemble, captioner


def fingerprint(cfg: Config, ensemble: TeacherEnsemble, captioner_spec: TeacherSpec, source_sha256: str) -> str:
    """What a reinforced shard depends on: its source bytes, the reinforcement parameters and the teachers."""
    return _fingerprint(cfg, ensemble.describe(), captioner_spec.model_dump(mode="json"), source_sha256)


def _fingerprint(cfg: Config, teachers: list[dict[str, Any]], captioner: dict[str, Any], source_sha256: str) -> str:
    content = {"reinforce": cfg.reinforce.model_dump(mode="json"), "teachers": teachers, "captioner": captioner,
               "source": source_sha256}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class ShardReinforcer:
    """Reinforce one shard: augment, embed, caption, write; teachers run in batches under inference mode."""

    def __init__(self, cfg: Config, ensemble: TeacherEnsemble, captioner: Captioner, timer: Timer):
        r = cfg.reinforce
        self.r, self.ensemble, self.captioner, self.timer = r, ensemble, captioner, timer
        self.reference_size = r.image_size or ensemble.image_sizes[0]
        self.augment = ReplayableAugment(self.reference_size, scale=tuple(r.crop_scale), ratio=tuple(r.crop_ratio),
                                         num_ops=r.rand_augment_ops, magnitude=r.rand_augment_magnitude, ops=r.ops)

    def _views(self, key: str, image) -> tuple[list, list[list[torch.Tensor]]]:
        """The N parameter sets of a sample and, per teacher, its N views preprocessed at that teacher's size."""
        params = [self.augment.sample(image, sample_generator(self.r.seed, key, a))
                  for a in range(self.r.num_augmentations)]
        per_teacher = []
        for t, size in enumerate(self.ensemble.image_sizes):
            views = [self.augment.apply(image, p, size=size, reference_size=self.reference_size) for p in params]
            per_teacher.append([self.ensemble.to_tensor(v, t) for v in views])
        return params, per_teacher

    def _embed_images(self, per_sample: list[list[list[torch.Tensor]]]) -> np.ndarray:
        """[samples * N, D_total] for views grouped per sample, in teacher batches of `batch_size`."""
        teachers = len(self.ensemble.image_sizes)
        flat = [[v for sample in per_sample for v in sample[t]] for t in range(teachers)]
        out = []
        for start in range(0, len(flat[0]), self.r.batch_size):
            batch = [torch.stack(flat[t][start:start + self.r.batch_size]) for t in range(teachers)]
            with self.timer.teacher():
                out.append(self.ensemble.encode_images(batch).float().cpu().numpy())
        return np.concatenate(out)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.r.batch_size):
            with self.timer.teacher():
                out.append(self.ensemble.encode_texts(texts[start:start + self.r.batch_size]).float().cpu().numpy())
        return np.concatenate(out)

    def _captions(self, images: list, generator: torch.Generator) -> list[list[str]]:
        """`num_captions` captions per (un-augmented) image, `batch_size` sequences at a time."""
        step = max(1, self.r.batch_size // self.r.num_captions)
        captions: list[list[str]] = []
        for start in range(0, len(images), step):
            batch = torch.stack([self.captioner.preprocess(im) for im in images[start:start + step]])
            with self.timer.teacher():
                captions += self.captioner.generate(batch, self.r.num_captions, self.r.top_p, self.r.temperature,
                                                    self.r.max_caption_tokens, generator)
        return captions

    def chunk(self, raws: list[dict[str, Any]], images: list, generator: torch.Generator) -> list[dict[str, Any]]:
        """Reinforced WebDataset samples for a chunk of decoded samples."""
        n = self.r.num_augmentations
        views = [self._views(raw["__key__"], image) for raw, image in zip(raws, images)]
        image_emb = self._embed_images([v for _, v in views]).reshape(len(raws), n, -1)
        syn = self._captions(images, generator)
        texts = [t for raw, caps in zip(raws, syn) for t in [decode_caption(raw), *caps]]
        text_emb = self._embed_texts(texts).reshape(len(raws), 1 + self.r.num_captions, -1)
        out = []
        for i, raw in enumerate(raws):
            sample = {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
            sample.update(encode_reinforcement([p.to_json() for p in views[i][0]], syn[i], image_emb[i], text_emb[i],
                                               dtype=self.r.embedding_dtype))
            out.append(sample)
        return out

    def shard(self, src: ShardRef, dst: Path, seed_key: str, bar: tqdm) -> tuple[int, SkipTally]:
        """Reinforce `src` into `dst` (atomically); returns (samples written, what was skipped and why). A damaged
        shard gives the samples before the damage; a sample that does not decode is skipped (skips.py)."""
        tally = SkipTally()
        generator = torch.Generator().manual_seed(int(hashlib.sha256(seed_key.encode()).hexdigest()[:15], 16))
        written = 0
        with atomic_path(dst) as tmp, open(tmp, "wb") as f:
            sink = wds.TarWriter(f, mtime=_FIXED_MTIME)
            raws, images = [], []
            for raw in iter_raw_samples([src], tally):
                try:
                    image = decode_image(raw)
                    decode_caption(raw)  # the chunk reads it again
                except SampleError as err:
                    tally.skip(err.reason, detail=f"sample {raw.get('__key__')!r} of {src.path}: {err}")
                    continue
                images.append(image)
                raws.append(raw)
                if len(raws) == self.r.batch_size:
                    written += self._write(sink, raws, images, generator, bar)
                    raws, images = [], []
            if raws:
                written += self._write(sink, raws, images, generator, bar)
            sink.close()
        return written, tally

    def _write(self, sink: wds.TarWriter, raws: list, images: list, generator: torch.Generator, bar: tqdm) -> int:
        for sample in self.chunk(raws, images, generator):
            sink.write(sample)
        bar.update(len(raws))
        return len(raws)


@contextlib.contextmanager
def _manifest_lock(out_dir: Path | str) -> Iterator[None]:
    """Serialises manifest rebuilds of workers sharing one output directory (a file lock: local or shared POSIX
    file systems; on object storage the DAG's join step publishes the manifest once, see `publish_reinforced`)."""
    if is_s3(out_dir):
        yield
        return
    with open(Path(out_dir) / ".manifest.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _entry_path(out_dir: Path | str, shard_url: str) -> str:
    return join(out_dir, ENTRIES, f"{shard_url}.json")


def _current_entry(out_dir: Path | str, shard_url: str, expected: str) -> dict[str, Any] | None:
    """The shard's entry if it was reinforced with the current fingerprint and its file is intact: the recorded
    sha256 locally, the recorded size and ETag of the uploaded object on S3."""
    try:
        entry = storage.read_json(_entry_path(out_dir, shard_url))
    except FileNotFoundError:
        return None
    if entry.get("fingerprint") != expected:
        return None
    shard = join(out_dir, shard_url)
    if is_s3(out_dir):
        found = storage.stat(shard)
        intact = found is not None and (found.size, found.etag) == (entry.get("size"), entry.get("etag"))
    else:
        intact = Path(shard).is_file() and sha256_file(shard) == entry["sha256"]
    return entry if intact else None


def publish_manifest(out_dir: Path | str, source: dict[str, Any], prints: dict[str, str],
                     reinforcement: dict[str, Any], max_skip_fraction: float) -> dict[str, Any]:
    """Rebuild `manifest.json` from the entries that carry the current fingerprints, in source order. The split is
    `complete` when every source shard has one; a trainer that distils refuses an incomplete split. Past
    `max_skip_fraction` of skipped samples over the reinforced shards (data.max_skip_fraction), a DataError, and no
    manifest is written."""
    with _manifest_lock(out_dir):
        shards, skipped, missing = [], Counter(source.get("skipped", {})), 0
        reinforced = SkipTally()
        for s in source["shards"]:
            entry = _current_entry(out_dir, s["url"], prints[s["url"]])
            if entry is None:
                missing += 1
                continue
            shards.append({"url": s["url"], "num_samples": entry["num_samples"], "sha256": entry["sha256"]})
            skipped.update(entry["skipped"])
            reinforced.update(SkipTally.from_state({"seen": entry["num_samples"] + sum(entry["skipped"].values()),
                                                    "skipped": entry["skipped"], "shards": entry.get("damaged", {})}))
        if shards:
            reinforced.check(max_skip_fraction, f"reinforce {out_dir}")
        manifest = {
            "schema_version": SCHEMA_VERSION, "split": source["split"],
            "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
            "params": source.get("params", {}), "tasks": source.get("tasks", {}), "skipped": dict(skipped),
            "reinforcement": {**reinforcement, "complete": missing == 0, "missing_shards": missing},
        }
        write_json_atomic(join(out_dir, MANIFEST), manifest)
    return manifest


def publish_reinforced(cfg: Config, data_dir: Path | str, out_dir: Path | str,
                       teacher_dir: Path | str | None = None) -> dict[str, Any]:
    """The join step after a fan-out of `reinforce(..., publish=False)` workers: publish the manifest of `out_dir`
    once, from the entries, without loading any teacher. An entry counts when its fingerprint is the one of the
    current parameters, of the teachers `cfg` (and `teacher_dir`) name and of its source shard. Raises
    FileNotFoundError when no shard has been reinforced with them."""
    source = _read_manifest(data_dir)
    specs, captioner_spec = default_specs(cfg, teacher_dir)
    wanted = _specs_record(specs)
    captioner = captioner_spec.model_dump(mode="json")
    for s in source["shards"]:
        try:
            entry = storage.read_json(_entry_path(out_dir, s["url"]))
        except FileNotFoundError:
            continue
        described = entry.get("reinforcement")
        if described is None or entry.get("teacher_specs") != wanted or described["captioner"] != captioner:
            continue
        prints = {u["url"]: _fingerprint(cfg, described["teachers"], captioner, u["sha256"]) for u in source["shards"]}
        if _current_entry(out_dir, s["url"], prints[s["url"]]) is not None:
            return publish_manifest(out_dir, source, prints, described, cfg.data.max_skip_fraction)
    raise FileNotFoundError(f"{out_dir}: no shard of {data_dir} is reinforced with the current parameters and "
                            f"teachers; run `lightclip reinforce` first")


def _specs_record(specs: list[TeacherSpec]) -> list[dict[str, Any]]:
    return [spec.model_dump(mode="json") for spec in specs]


def _read_manifest(data_dir: Path | str) -> dict[str, Any]:
    """The source manifest; its shard URLs, which name the output's files too, are confined to the dataset."""
    return read_manifest(data_dir)


def parse_shard_range(text: str | None, count: int) -> range:
    """`"a:b"` (Python slice bounds, either may be empty) -> the shard indices; None -> every shard."""
    if not text:
        return range(count)
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"--shards={text!r}: expected START:END, e.g. 0:4")
    try:
        start, end = (int(p) if p else None for p in parts)
    except ValueError:
        raise ValueError(f"--shards={text!r}: START and END must be integers") from None
    return range(count)[slice(start, end)]


def reinforce(cfg: Config, data_dir: str | Path, out_dir: str | Path, teacher_dir: str | Path | None = None,
              shard_range: range | None = None, sink: MetricSink | None = None,
              cache_dir: str | Path | None = None, publish: bool = True) -> ReinforceResult:
    """Reinforce the shards `shard_range` (default: all) of the split in `data_dir` into `out_dir` (either may be an
    `s3://` prefix), then publish the manifest. Fan-out workers writing to S3 pass `publish=False` and leave the
    manifest to one `publish_reinforced` call. `cache_dir` holds downloaded teachers and, for S3, a scratch
    directory of the shards in flight (default: next to a local `out_dir`, else the system temp directory)."""
    data_dir = str(data_dir) if is_s3(data_dir) else Path(data_dir)
    out_dir = str(out_dir) if is_s3(out_dir) else Path(out_dir)
    source = _read_manifest(data_dir)
    indices = shard_range if shard_range is not None else range(len(source["shards"]))
    if isinstance(out_dir, Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ENTRIES).mkdir(exist_ok=True)
        cache_dir = Path(cache_dir) if cache_dir else out_dir.parent / ".teacher-cache"
    else:
        cache_dir = Path(cache_dir) if cache_dir else storage.default_cache_dir()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    specs, captioner_spec = default_specs(cfg, teacher_dir)
    ensemble = TeacherEnsemble(specs, cache_dir, device)
    captioner = Captioner(captioner_spec, cache_dir, device)
    timer = Timer()
    worker = ShardReinforcer(cfg, ensemble, captioner, timer)
    prints = {s["url"]: fingerprint(cfg, ensemble, captioner_spec, s["sha256"]) for s in source["shards"]}
    reinforcement = {
        "layout": "datacompdr", "teachers": ensemble.describe(), "dims": ensemble.dims, "scales": ensemble.scales,
        "captioner": captioner_spec.model_dump(mode="json"), "image_size": worker.reference_size,
        "num_augmentations": cfg.reinforce.num_augmentations, "num_captions": cfg.reinforce.num_captions,
        "params": cfg.reinforce.model_dump(mode="json"),
    }
    todo = [source["shards"][i] for i in indices
            if _current_entry(out_dir, source["shards"][i]["url"], prints[source["shards"][i]["url"]]) is None]
    reused = len(indices) - len(todo)
    log.info("reinforcing %d of %d shards (%d already reinforced) with teachers %s", len(todo), len(indices), reused,
             [t["model"] for t in reinforcement["teachers"]])

    started = time.perf_counter()
    samples, tally = 0, SkipTally()
    expected = sum(source["shards"][i]["num_samples"] for i in indices)
    with contextlib.ExitStack() as stack:
        shards = _ShardFiles(data_dir, out_dir, cache_dir, stack)
        bar = stack.enter_context(tqdm(total=sum(s["num_samples"] for s in todo), desc="reinforce", unit="sample"))
        for s in todo:
            shard_started = time.perf_counter()
            written, shard_tally = worker.shard(shards.source(s), shards.staged(s["url"]),
                                                f"{cfg.reinforce.seed}/{s['url']}", bar)
            tally.update(shard_tally)
            # a split bad beyond the limit stops before this shard is published (those before it are kept)
            tally.check_running(cfg.data.max_skip_fraction, expected, f"reinforce --data {data_dir}")
            entry = {"url": s["url"], "num_samples": written, "skipped": shard_tally.skipped,
                     "damaged": dict(shard_tally.shards), "fingerprint": prints[s["url"]],
                     "source_sha256": s["sha256"], "reinforcement": reinforcement,
                     "teacher_specs": _specs_record(specs)}
            write_json_atomic(_entry_path(out_dir, s["url"]), {**entry, **shards.publish(s["url"])})
            samples += written
            if sink is not None:
                sink.log_metrics({"reinforce/samples_per_s": written / (time.perf_counter() - shard_started),
                                  "reinforce/samples": float(samples)}, step=samples)
    wall = time.perf_counter() - started
    manifest = publish_manifest(out_dir, source, prints, reinforcement, cfg.data.max_skip_fraction) \
        if publish else None
    metrics = {"samples": float(samples), "wall_time_s": wall, "samples_per_s": samples / wall if wall else 0.0,
               "teacher_time_s": timer.teacher_s,
               "teacher_fraction": timer.teacher_s / wall if wall and samples else 0.0,
               "shards_written": float(len(todo)), "shards_reused": float(reused), **tally.metrics()}
    complete = manifest["reinforcement"]["complete"] if manifest else None
    log.info("reinforced %d samples in %.1f s (%.1f samples/s, %.0f%% in teacher forward passes); manifest %s",
             samples, wall, metrics["samples_per_s"], 100 * metrics["teacher_fraction"],
             "left to the join step (publish=False)" if manifest is None else "complete" if complete else
             f"incomplete ({manifest['reinforcement']['missing_shards']} shards missing)")
    return ReinforceResult(out_dir, len(todo), reused, samples, tally.skipped, complete, metrics)


class _ShardFiles:
    """Where the shard in flight is read and written: in place for local directories; for `s3://` a scratch
    directory under `cache_dir`, emptied shard by shard, so a worker's disk holds one source and one output shard."""

    def __init__(self, data_dir: Path | str, out_dir: Path | str, cache_dir: Path, stack: contextlib.ExitStack):
        self.data_dir, self.out_dir = data_dir, out_dir
        self.scratch = None
        if is_s3(data_dir) or is_s3(out_dir):
            cache_dir.mkdir(parents=True, exist_ok=True)
            self.scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".reinforce-", dir=cache_dir)))

    def source(self, shard: dict[str, Any]) -> ShardRef:
        """The source shard as a local file (downloaded if remote) with its manifest's count and sha256, which the
        reader checks; a missing object is read as a missing shard."""
        if not is_s3(self.data_dir):
            return ShardRef(str(Path(self.data_dir) / shard["url"]), shard["num_samples"], shard["sha256"])
        local = self.scratch / "source" / shard["url"]
        with contextlib.suppress(FileNotFoundError):
            storage.download_file(join(self.data_dir, shard["url"]), local)
        return ShardRef(str(local), shard["num_samples"], shard["sha256"])

    def staged(self, url: str) -> Path:
        return Path(self.out_dir) / url if not is_s3(self.out_dir) else self.scratch / "out" / url

    def publish(self, url: str) -> dict[str, Any]:
        """Make the written shard visible at its final place; returns what its entry records about the file."""
        staged = self.staged(url)
        recorded = {"sha256": sha256_file(staged)}
        if is_s3(self.out_dir):
            final = join(self.out_dir, url)
            storage.upload_file(staged, final)
            found = storage.stat(final)
            if found is None:
                raise FileNotFoundError(f"{final}: uploaded, but the object is not there")
            recorded.update(size=found.size, etag=found.etag)
            staged.unlink()
        if is_s3(self.data_dir):
            (self.scratch / "source" / url).unlink(missing_ok=True)
        return recorded
