"""Training throughput (samples/s) of our trainer against open_clip's training loop, at 1 and 2 processes on CPU.

Both loops train the same freshly initialised model (contrastive loss only) on the same shards, the same global batch
and the same per-rank DataLoader. Ours is `lightclip train` (under `torchrun --nproc-per-node 2` for two processes);
the reference is open_clip's `open_clip_train.train.train_one_epoch` with its own DistributedDataParallel wrapping and
`ClipLoss(local_loss=True, gather_with_grad=True)` under torchrun. Each process gets cores / processes torch threads.
The time of a step is the interval between consecutive batches on rank 0 (data wait included); the figure is the
median after warm-up. Runs alternate (ours, open_clip, ...) so that drift on a shared machine hits both. Scaling
efficiency 1 -> 2 processes: samples/s at 2 / (2 x samples/s at 1), for each loop.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 2] [--batch 128] [--procs 1 2]
    python benchmarks/train_throughput.py --steps 3 --rounds 1 --batch 16 --samples 512 --dry-run   # smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median_after_warmup, publish  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.prepare import prepare  # noqa: E402

WARMUP = 5
TORCHRUN = Path(sys.executable).parent / "torchrun"


def overrides(args: argparse.Namespace, procs: int) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // procs)
    return [f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "tracking.enabled=false",
            f"data.synthetic.num_train={args.samples}", "data.synthetic.num_val=1", "data.synthetic.num_test=1",
            f"data.samples_per_shard={args.samples // 16}", f"train.checkpoint_every={10**6}", f"train.threads={threads}",
            "train.resume=false", "objectives.token.enabled=false", "objectives.mlm.enabled=false",
            "objectives.distill.enabled=false", "objectives.contrastive.soft_targets=none"]


def launcher(procs: int) -> list[str]:
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable]


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def ours(params: Path, data: Path, out: Path, procs: int, batch: int) -> list[float]:
    """Step intervals of `lightclip train` (rank 0's step log)."""
    run([*launcher(procs), "-m", "lightclip_core.cli", "train", "--params", str(params), "--data", str(data), "--out", str(out)],
        max(1, (os.cpu_count() or 1) // procs))
    with open(out / "train_log.csv") as f:
        return [batch / float(r["samples_per_s"]) for r in csv.DictReader(f)]


def open_clip_loop(params: Path, data: Path, out: Path, procs: int, steps: int) -> list[float]:
    """Step intervals of open_clip's train_one_epoch (this script's worker mode, rank 0's batch times)."""
    result = out / "open_clip_steps.json"
    run([*launcher(procs), str(Path(__file__).resolve()), "--worker", "--params", str(params), "--data", str(data),
         "--result", str(result), "--steps", str(steps)], max(1, (os.cpu_count() or 1) // procs))
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------------ worker
class _Timed:
    """Wrap a DataLoader as open_clip's loop expects it ((images, texts) pairs, num_batches, num_samples) and record
    the time at which each batch is handed to the loop."""

    def __init__(self, loader, steps: int, world_size: int):
        self.loader, self.steps, self.stamps = loader, steps, []
        self.num_batches, self.num_samples = steps, steps * loader.batch_size * world_size

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.steps:
                break
            self.stamps.append(time.perf_counter())
            yield batch["images"], batch["tokens"]
        self.stamps.append(time.perf_counter())


def worker(args: argparse.Namespace) -> None:
    """One rank of open_clip's training loop on our model, data and optimizer; rank 0 writes its step intervals."""
    import torch
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from lightclip_core.models import build_model
    from lightclip_core.infra.distributed import init_from_env, shutdown
    from lightclip_core.train.trainer import build_optimizer, make_loader, seed_everything

    cfg = load_config(args.params)
    torch.set_num_threads(cfg.train.threads or 1)
    world = init_from_env()
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    dist_model = torch.nn.parallel.DistributedDataParallel(model) if world.distributed else model
    loader, stream = make_loader(cfg, args.data, world.rank, world.world_size)
    timed = _Timed(loader, args.steps, world.world_size)
    data = {"train": SimpleNamespace(dataloader=timed, set_epoch=stream.set_epoch)}
    run_args = SimpleNamespace(
        device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False, grad_clip_norm=1.0,
        horovod=False, log_every_n_steps=10**9, rank=world.rank, local_rank=world.local_rank,
        world_size=world.world_size, batch_size=loader.batch_size, wandb=False, save_logs=False, val_frequency=0,
        distributed=world.distributed, lr=cfg.train.lr,
    )
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=world.rank, world_size=world.world_size)
    scheduler = cosine_lr(optimizer, cfg.train.lr, cfg.train.warmup_steps, args.steps)
    train_one_epoch(dist_model, data, loss, 0, optimizer, None, scheduler, None, run_args)
    if world.is_main:
        Path(args.result).write_text(json.dumps([b - a for a, b in zip(timed.stamps, timed.stamps[1:])]))
    shutdown()


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--samples", type=int, default=4096, help="training samples (16 shards)")
    parser.add_argument("--dry-run", action="store_true", help="print the result; do not write results or docs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sps: dict[str, dict[int, float]] = {"ours": {}, "open_clip": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_config(ROOT / "params.yaml", overrides(args, 1))
        prepare(base.data, tmp / "data")
        train_dir = tmp / "data" / "train"
        times: dict[str, dict[int, list[float]]] = {"ours": {p: [] for p in args.procs},
                                                    "open_clip": {p: [] for p in args.procs}}
        for r in range(args.rounds):
            for procs in args.procs:
                cfg = load_config(ROOT / "params.yaml", overrides(args, procs))
                params = tmp / f"params-{procs}.yaml"
                params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
                out = tmp / f"ours-{procs}-{r}"
                skip = min(WARMUP, args.steps - 1)  # a smoke run of a few steps keeps its last one
                times["ours"][procs] += ours(params, train_dir, out, procs, args.batch)[skip:]
                times["open_clip"][procs] += open_clip_loop(params, train_dir, out, procs, args.steps)[skip:]
        for loop in sps:
            for procs in args.procs:
                sps[loop][procs] = args.batch / median_after_warmup(times[loop][procs], 0)

    command = (f"python benchmarks/train_throughput.py --steps {args.steps} --rounds {args.rounds} --batch {args.batch} "
               f"--procs {' '.join(map(str, args.procs))}")
    result = {"samples_per_s": {loop: {str(p): v for p, v in by.items()} for loop, by in sps.items()},
              "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "procs": args.procs,
              "model": base.model.model_dump(mode="json"), "workers": base.train.workers,
              "threads_per_process": {str(p): max(1, (os.cpu_count() or 1) // p) for p in args.procs}}
    if 1 in args.procs and 2 in args.procs:
        result["scaling_efficiency_1_to_2"] = {loop: sps[loop][2] / (2 * sps[loop][1]) for loop in sps}
    if args.dry_run:
        print(json.dumps(result, indent=2))
        return
    if 1 in args.procs:
        publish("train_throughput", {**result, "ratio": sps["ours"][1] / sps["open_clip"][1]},
                measured=f"ours {sps['ours'][1]:.0f} samples/s (1 process)",
                reference=f"open_clip train_one_epoch {sps['open_clip'][1]:.0f} samples/s",
                ratio=sps["ours"][1] / sps["open_clip"][1], command=command)
    if "scaling_efficiency_1_to_2" in result:
        eff = result["scaling_efficiency_1_to_2"]
        publish("train_scaling", {**result, "ratio": sps["ours"][2] / sps["open_clip"][2]},
                measured=f"ours {sps['ours'][2]:.0f} samples/s on 2 processes, scaling efficiency {eff['ours']:.2f}",
                reference=f"open_clip DDP {sps['open_clip'][2]:.0f} samples/s, efficiency {eff['open_clip']:.2f}",
                ratio=sps["ours"][2] / sps["open_clip"][2], command=command)


if __name__ == "__main__":
    main()
