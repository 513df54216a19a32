"""Data loader throughput against what the training step consumes.

The loader alone (decode, preprocess, tokenize, collate in DataLoader workers) is timed over the same shards for
each worker count; the training step alone (forward, backward, optimizer on one fixed in-memory batch) gives the
consumption rate. A ratio above 1 means the loader keeps the step fed; on a 2-core machine both compete for cores,
which is why the default loads in the training process (workers=0).

    python benchmarks/loader_throughput.py [--batches 40] [--batch 128]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_after_warmup, publish  # noqa: E402

import torch  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.prepare import prepare  # noqa: E402
from lightclip_core.models.tokenizer import trim_padding  # noqa: E402
from lightclip_core.losses import contrastive_loss  # noqa: E402
from lightclip_core.models import build_model  # noqa: E402
from lightclip_core.train.trainer import build_optimizer, make_loader  # noqa: E402

WARMUP = 3


def loader_rate(cfg, train_dir: Path, batches: int) -> float:
    loader, stream = make_loader(cfg, train_dir)
    stamps = []
    for i, _ in enumerate(loader):
        stamps.append(time.perf_counter())
        if i == batches:
            break
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return cfg.train.batch_size / median_after_warmup(gaps, WARMUP)


def step_rate(cfg, train_dir: Path, steps: int) -> float:
    batch = next(iter(make_loader(cfg, train_dir)[0]))
    images, tokens = batch["images"], batch["tokens"]
    model = build_model(cfg.model).train()
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.visual.to(memory_format=memory_format)
    images, tokens = images.contiguous(memory_format=memory_format), trim_padding(tokens)
    optimizer = build_optimizer(model, cfg)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(images, tokens)
        loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return cfg.train.batch_size / median_after_warmup(times, WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = [f"train.batch_size={args.batch}", "data.synthetic.num_train=8192", "data.synthetic.num_val=1",
                "data.synthetic.num_test=1", "data.samples_per_shard=1024", "tracking.enabled=false"]
        cfg = load_config(root / "params.yaml", base)
        prepare(cfg.data, tmp / "data")
        train_dir = tmp / "data" / "train"
        consumed = step_rate(cfg, train_dir, 15)
        loaders = {w: loader_rate(load_config(root / "params.yaml", [*base, f"train.workers={w}"]), train_dir,
                                  args.batches) for w in (0, 1, 2)}
    default = loaders[cfg.train.workers]
    publish(
        "loader_throughput",
        {"loader_samples_per_s_by_workers": loaders, "step_samples_per_s": consumed, "ratio": default / consumed,
         "default_workers": cfg.train.workers, "batch": args.batch},
        measured=f"loader {default:.0f} samples/s (workers={cfg.train.workers}; "
                 + ", ".join(f"{w}w {r:.0f}" for w, r in loaders.items()) + ")",
        reference=f"training step consumes {consumed:.0f} samples/s", ratio=default / consumed,
        command=f"python benchmarks/loader_throughput.py --batches {args.batches} --batch {args.batch}",
    )


if __name__ == "__main__":
    main()
