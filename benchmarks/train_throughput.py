"""Training throughput (samples/s) of our trainer against open_clip's own training step, same model, batch, data.

Both loops read the same shards through the same DataLoader and train the same freshly initialised model; the time
of a step is the interval between consecutive batches (data wait included). Runs alternate (ours, open_clip, ours,
open_clip, ...) so that drift on a shared machine hits both; the figure is the median step time after warm-up.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 2] [--batch 128]
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_after_warmup, publish  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.prepare import prepare  # noqa: E402
from lightclip_core.models import build_model  # noqa: E402
from lightclip_core.train.trainer import build_optimizer, make_loader, seed_everything, train  # noqa: E402

WARMUP = 5


def ours(cfg, train_dir: Path, out_dir: Path) -> list[float]:
    result = train(cfg, train_dir, out_dir)
    with open(result.train_log) as f:
        return [cfg.train.batch_size / float(r["samples_per_s"]) for r in csv.DictReader(f)]


class _Timed:
    """Wrap a DataLoader: record the time at which each batch is handed to the training loop."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self.stamps = loader, steps, []
        self.num_batches, self.num_samples = steps, steps * loader.batch_size

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.steps:
                break
            self.stamps.append(time.perf_counter())
            yield batch
        self.stamps.append(time.perf_counter())


def open_clip_step(cfg, train_dir: Path, steps: int) -> list[float]:
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    loader, stream = make_loader(cfg, train_dir)
    timed = _Timed(loader, steps)
    data = {"train": SimpleNamespace(dataloader=timed, set_epoch=stream.set_epoch)}
    args = SimpleNamespace(
        device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False, grad_clip_norm=1.0,
        horovod=False, log_every_n_steps=10**9, rank=0, local_rank=0, world_size=1, batch_size=cfg.train.batch_size,
        wandb=False, save_logs=False, val_frequency=0, distributed=False, lr=cfg.train.lr,
    )
    scheduler = cosine_lr(optimizer, cfg.train.lr, cfg.train.warmup_steps, steps)
    train_one_epoch(model, data, ClipLoss(), 0, optimizer, None, scheduler, None, args)
    return [b - a for a, b in zip(timed.stamps, timed.stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = [f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "tracking.enabled=false",
                     "data.synthetic.num_train=4096", "data.synthetic.num_val=1", "data.synthetic.num_test=1",
                     "data.samples_per_shard=512", f"train.checkpoint_every={10**6}"]
        cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", overrides)
        prepare(cfg.data, tmp / "data")
        ours_s, ref_s = [], []
        for r in range(args.rounds):
            ours_s += ours(cfg, tmp / "data" / "train", tmp / f"ours{r}")[WARMUP:]
            ref_s += open_clip_step(cfg, tmp / "data" / "train", args.steps)[WARMUP:]
    ours_sps = args.batch / median_after_warmup(ours_s, 0)
    ref_sps = args.batch / median_after_warmup(ref_s, 0)
    publish(
        "train_throughput",
        {"ours_samples_per_s": ours_sps, "open_clip_samples_per_s": ref_sps, "ratio": ours_sps / ref_sps,
         "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "model": cfg.model.model_dump(mode="json"),
         "workers": cfg.train.workers},
        measured=f"ours {ours_sps:.0f} samples/s", reference=f"open_clip train_one_epoch {ref_sps:.0f} samples/s",
        ratio=ours_sps / ref_sps, command=f"python benchmarks/train_throughput.py --steps {args.steps} "
                                          f"--rounds {args.rounds} --batch {args.batch}",
    )


if __name__ == "__main__":
    main()
