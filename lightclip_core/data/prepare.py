"""The `prepare` stage: synthetic generation or ingestion into `out_dir/{train,val,test}` shard directories.

The whole output is built in a hidden sibling directory and swapped in with two renames at the end, so a rerun
leaves no stale shards, a failed run leaves the previous output untouched, and readers never see a mixture.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from lightclip_core.config import DataConfig
from lightclip_core.data import ingest, synthetic
from lightclip_core.data.shards import ShardSetWriter
from lightclip_core.data.skips import DataError, SkipTally

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SMALL_SPLIT = 100  # samples: below this a split's figures move by a point or more per sample
OWN_DATA = Path("data/own")  # where own data lives in this repository: dvc.yaml's prepare stage depends on it


@dataclass
class PrepareResult:
    """Where the splits are, how many samples each holds, how many input samples were skipped (by reason) and how
    many input tars were damaged (by event); `skip_metrics` has both, and the total, as metrics (skips.py)."""

    out_dir: Path
    counts: dict[str, int]
    skipped: dict[str, int]
    damaged_shards: dict[str, int] = field(default_factory=dict)
    skip_metrics: dict[str, float] = field(default_factory=dict)


def prepare(cfg: DataConfig, out_dir: str | os.PathLike) -> PrepareResult:
    """Write the train/val/test shard directories of `cfg.source` into `out_dir`, replacing a previous output."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = _fresh_sibling(out_dir, "build")
    try:
        if cfg.source == "synthetic":
            counts, tally = _build_synthetic(cfg, build)
        else:
            counts, tally = _build_ingested(cfg, build)
        check_split_sizes(cfg, counts)  # before the swap: an empty training split replaces nothing
        swap_in(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info("prepared %s in %s: %s", cfg.source, out_dir, ", ".join(f"{s}={n}" for s, n in counts.items()))
    return PrepareResult(out_dir=out_dir, counts=counts, skipped=tally.skipped,
                         damaged_shards=dict(sorted(tally.shards.items())), skip_metrics=tally.metrics())


def check_split_sizes(cfg: DataConfig, counts: dict[str, int]) -> None:
    """An empty training split is a DataError; splits under SMALL_SPLIT samples get one warning line (a val or test
    split that small measures little: each sample is worth 1/n of every accuracy)."""
    sizes = ", ".join(f"{s}={n}" for s, n in counts.items())
    knobs = ("data.synthetic.num_val/num_test" if cfg.source == "synthetic" else
             f"data.ingest.val_fraction={cfg.ingest.val_fraction}, data.ingest.test_fraction={cfg.ingest.test_fraction}")
    if counts.get("train", 0) == 0:
        raise DataError(f"the training split is empty ({sizes}): add data or lower {knobs}")
    small = [f"{s}={n}" for s, n in counts.items() if n < SMALL_SPLIT]
    if small:
        log.warning("split%s under %d samples: %s (a sample moves a val or test figure by 1/n; %s)",
                    "s" if len(small) > 1 else "", SMALL_SPLIT, ", ".join(small), knobs)


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything but split directories: it is not a previous output."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in SPLITS)
    if foreign:
        raise FileExistsError(f"output {out_dir} holds {foreign}, which prepare does not write; "
                              "refusing to replace it (choose an empty or new directory)")


def _fresh_sibling(out_dir: Path, role: str) -> Path:
    """A new hidden directory next to `out_dir` (same file system, so renames are atomic).

    Made with mkdir rather than mkdtemp: mkdtemp's 0700 mode would become the published directory's mode.
    """
    for _ in range(100):
        path = out_dir.parent / f".{out_dir.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary directory next to {out_dir}")


def swap_in(build: Path, out_dir: Path) -> None:
    """Move `build` to `out_dir`; an existing `out_dir` is moved aside first and deleted after."""
    if not out_dir.exists():
        os.replace(build, out_dir)
        return
    aside = _fresh_sibling(out_dir, "old")
    try:
        os.replace(out_dir, aside / out_dir.name)
        os.replace(build, out_dir)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _writers(cfg: DataConfig, build: Path) -> dict[str, ShardSetWriter]:
    return {split: ShardSetWriter(build / split, split, cfg.samples_per_shard) for split in SPLITS}


def _write_all(pairs: Iterable[tuple[str, Any]], writers: dict[str, ShardSetWriter], total: int | None,
               desc: str) -> None:
    for split, sample in tqdm(pairs, total=total, desc=desc, unit="sample", disable=None):
        writers[split].write(sample)


def _close_all(cfg: DataConfig, writers: dict[str, ShardSetWriter], tasks: dict[str, Any],
               skipped: dict[str, dict[str, int]]) -> dict[str, int]:
    params = cfg.model_dump(mode="json")
    manifests = {split: w.close(params, tasks, skipped.get(split, {})) for split, w in writers.items()}
    return {split: m["num_samples"] for split, m in manifests.items()}


def _build_synthetic(cfg: DataConfig, build: Path) -> tuple[dict[str, int], SkipTally]:
    writers = _writers(cfg, build)
    total = sum(synthetic.split_sizes(cfg).values())
    _write_all(synthetic.iter_synthetic(cfg), writers, total, "synthetic")
    return _close_all(cfg, writers, synthetic.synthetic_tasks(), {}), SkipTally(seen=total)


def _warn_untracked(cfg: DataConfig) -> None:
    """In the DVC project (a dvc.yaml here), say when an input lies outside data/own: `dvc repro` cannot see it."""
    if not Path("dvc.yaml").is_file():
        return
    for name in ("path", "images_dir", "class_names"):
        value = getattr(cfg.ingest, name)
        if value and not Path(value).resolve().is_relative_to(OWN_DATA.resolve()):
            log.warning("data.ingest.%s=%r is outside %s, the directory dvc.yaml's prepare stage depends on: "
                        "`dvc repro` will not notice when it changes", name, value, OWN_DATA)


def _build_ingested(cfg: DataConfig, build: Path) -> tuple[dict[str, int], SkipTally]:
    _warn_untracked(cfg)
    source = ingest.open_source(cfg)
    writers = _writers(cfg, build)
    _write_all(source.samples, writers, source.total, cfg.source)
    # before any manifest exists: a failed check publishes nothing
    source.tally.check(cfg.max_skip_fraction, source.name, "no samples found; check data.ingest.path")
    per_split = {split: source.tally.split_skipped(split) for split in SPLITS}
    return _close_all(cfg, writers, source.tasks, per_split), source.tally
