"""Index published reinforced shards (DataCompDR, or anyone's) so that the trainer can distil from them.

Published DataCompDR shards come without our `manifest.json`. What the trainer needs beyond the shard list is what
the shards do not say themselves: the teachers' embedding widths and distillation scales, and the image size the
augmentations were sampled at (DataCompDR-12M: two ViT-L/14 teachers, dims 768 + 768, scale 100, 224 px). Every
sample is decoded once here, so a shard with missing reinforcement fields or another width is refused up front.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from lightclip_core.data.reinforced import ReinforcementError, decode_reinforcement
from lightclip_core.data.shards import MANIFEST, SCHEMA_VERSION, iter_raw_samples
from lightclip_core.infra.storage import sha256_file, write_json_atomic


def index_reinforced(dataset_dir: str | os.PathLike, dims: Sequence[int], scales: Sequence[float], image_size: int,
                     split: str = "train", pattern: str = "*.tar") -> dict[str, Any]:
    """Write `manifest.json` for the reinforced shards in `dataset_dir` (sorted by name); returns the manifest.

    Raises ReinforcementError naming the sample for a sample without reinforcement fields or whose embedding width
    differs from `sum(dims)`, and ValueError for inconsistent arguments or a directory without shards."""
    dataset_dir = Path(dataset_dir)
    if len(dims) != len(scales) or not dims:
        raise ValueError(f"--dims {list(dims)} and --scales {list(scales)}: one width and one scale per teacher")
    shards = sorted(dataset_dir.glob(pattern))
    if not shards:
        raise ValueError(f"{dataset_dir}: no shards matching {pattern!r}")
    width = sum(dims)
    entries, augmentations, captions = [], Counter(), Counter()
    for shard in shards:
        count = 0
        for raw in iter_raw_samples([str(shard)], require=()):  # published shards may come without images
            r = decode_reinforcement(raw)
            if r.dim != width:
                raise ReinforcementError(f"sample {raw['__key__']!r} in {shard.name}: teacher embedding width "
                                         f"{r.dim} != sum of --dims {list(dims)} = {width}")
            augmentations[r.num_augmentations] += 1
            captions[r.num_synthetic] += 1
            count += 1
        entries.append({"url": shard.name, "num_samples": count, "sha256": sha256_file(shard)})
    manifest = {
        "schema_version": SCHEMA_VERSION, "split": split, "num_samples": sum(e["num_samples"] for e in entries),
        "shards": entries, "params": {"source": "published-reinforced"}, "tasks": {}, "skipped": {},
        "reinforcement": {
            "layout": "datacompdr", "dims": list(dims), "scales": [float(s) for s in scales],
            "image_size": int(image_size), "teachers": [{"dim": d, "logit_scale": float(s)} for d, s in
                                                        zip(dims, scales)],
            "num_augmentations": min(augmentations), "num_captions": min(captions),
            "complete": True, "missing_shards": 0,
        },
    }
    write_json_atomic(dataset_dir / MANIFEST, manifest)
    return manifest
