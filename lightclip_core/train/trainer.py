"""The training stage: setup, loop, log, checkpoint; one process, or N ranks under torchrun.

Objectives are modules returning named terms (losses/base.py); `TrainingLoss` (losses/objective.py) holds the model and
the objectives, sums every `*_loss` term times its objective's weight and returns every term's global value.
Objective parameters train with the model but stay out of `final.pt`.

Data parallel (`torchrun --nproc-per-node N -m lightclip_core.cli train ...`): `TrainingLoss` is wrapped in
DistributedDataParallel, so the objectives' parameters are synchronised with the model's. `train.batch_size` is the
global batch of one optimizer step; each rank takes batch_size / (N * accum_steps) samples per micro-step, and the
contrastive objectives gather features across ranks, so the same params.yaml trains the same model on 1 or N
processes (no learning-rate rescaling). BatchNorm statistics are the exception: they are computed per rank (over the
local batch), so a model with BatchNorm trains slightly differently on N ranks. Rank 0 alone writes the step log,
the tracking metrics and the checkpoints; every rank stops together (the loss is averaged over ranks before the
finiteness check, so a NaN on one rank stops all).

Bad samples are skipped and counted per rank (train/data.py). `data.max_skip_fraction` is judged on their sum over
the ranks, which the ranks exchange at every checkpoint and at the end (so they all stop together, before writing
the checkpoint or `final.pt`); a single process also judges its own counts after every step. Either stops early
only when the skipped samples exceed the limit's share of the whole split.

Resume: a step checkpoint holds everything the next step depends on (model, objectives with their EMA, optimizer,
scheduler, every RNG state of every rank, every rank's data position) and a fingerprint of the training-relevant
configuration. `train` continues from the newest valid checkpoint in `<out>/checkpoints` when the fingerprint matches
(the step log is truncated to its step and continued) and starts afresh with a warning when it does not. On CPU in
deterministic mode a run killed at any step and resumed ends with the same weights, bit for bit, as one that was not.
A run started from weights (`model.init_from`, train/start.py) keeps them in every checkpoint as `start_model` (the
export's WiSE-FT endpoint), and their digest is part of the fingerprint; a resumed run continues from its checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.shards import describe_dataset, read_manifest
from lightclip_core.infra.distributed import (World, all_gather_objects, broadcast_object, current_world, device_for,
                                              init_from_env, shutdown, world_from_env)
from lightclip_core.infra.sink import MetricSink
from lightclip_core.infra.storage import atomic_path
from lightclip_core.losses.objective import TrainingLoss, build_objectives
from lightclip_core.models import build_model, model_summary
from lightclip_core.models.tokenizer import trim_padding
from lightclip_core.train.checkpoint import (checkpoint_name, load_checkpoint, newest_valid_checkpoint,
                                             prune_checkpoints, remove_partial_writes, save_checkpoint)
from lightclip_core.train.data import (EXTRA_KEYS, DataPosition, StepBatches, local_batch_size, make_loader,
                                       ranks_skips, reinforcement_of)
from lightclip_core.train.optim import adamw
from lightclip_core.train.schedule import build_scheduler
from lightclip_core.train.start import START_KEY, load_start, state_digest

log = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "samples_seen")  # then every term
CHECKPOINT_FORMAT = 2
# train fields that do not change what is computed: a checkpoint written under other values of them is resumed
NOT_FINGERPRINTED = {"checkpoint_every", "keep_checkpoints", "log_every", "threads", "resume", "dist_timeout_s",
                     "compile", "grad_checkpointing"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    final_checkpoint: Path
    train_log: Path
    steps: int
    samples_seen: int
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0  # the step training continued from (0: a fresh start)


def seed_everything(seed: int | str, deterministic: bool) -> None:
    """Seed python, numpy and torch; a string seed (e.g. "0/rank1") is hashed to one."""
    if isinstance(seed, str):
        seed = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "little")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_optimizer(model: nn.Module, cfg: Config, objectives: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings or the temperature), over the
    model and the objectives' own parameters; the image tower (`visual.*`) at `train.image_lr` when set."""
    t = cfg.train
    skip = model.no_weight_decay()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if objectives is not None:
        named += [(f"objectives.{n}", p) for n, p in objectives.named_parameters() if p.requires_grad]
        skip = skip | {f"objectives.{n}" for n, p in objectives.named_parameters() if p.ndim < 2}
    groups = []
    for tower_lr, in_tower in ((t.image_lr or t.lr, True), (t.lr, False)):
        for decay in (True, False):
            params = [p for n, p in named if n.startswith("visual.") == in_tower and (n not in skip) == decay]
            if params:
                groups.append({"params": params, "weight_decay": t.weight_decay if decay else 0.0, "lr": tower_lr})
    return adamw(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def plan_steps(cfg: Config, num_samples: int) -> tuple[int, int]:
    """(nominal steps per epoch, total steps). Every step sees a full global batch (partial batches are dropped);
    an epoch is one pass over the split, or `train.samples_per_epoch` samples."""
    t = cfg.train
    steps_per_epoch = (t.samples_per_epoch or num_samples) // t.batch_size
    if num_samples < t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size}: larger than the training split ({num_samples})")
    total = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    return steps_per_epoch, total


def training_lineage(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the final weights were trained on and how: the split (lightclip_core.data.shards.describe_dataset), the
    `train` section and the objectives switched on. It travels into the export, so that reports describe the model
    from its own lineage, not from the parameters at evaluation time."""
    objectives = cfg.objectives.model_dump(mode="json")
    lineage = {"data": describe_dataset(manifest), "train": cfg.train.model_dump(mode="json"),
               "objectives": sorted(name for name, section in objectives.items() if section["enabled"])}
    source = cfg.model.start_source()
    return {**lineage, "init_from": source} if source is not None else lineage


def train_fingerprint(cfg: Config, manifest: dict[str, Any], world_size: int,
                      start: dict[str, torch.Tensor] | None = None) -> str:
    """A hash of what decides the computation: the train section (but for NOT_FINGERPRINTED), the model, the
    objectives, the training shards, the number of ranks (which splits the data) and, from `model.init_from`, the
    start weights' location and content (an alias that moved is other weights)."""
    payload = {"train": cfg.train.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
               "model": cfg.model.architecture(), "objectives": cfg.objectives.model_dump(mode="json"),
               "shards": [[s["url"], s["num_samples"], s.get("sha256")] for s in manifest["shards"]],
               "world_size": world_size}
    if start is not None:
        payload["init_from"] = {"uri": cfg.model.start_source(), "sha256": state_digest(start)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """Every global RNG state of this process, as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ step log
class StepLog:
    """`train_log.csv`, one row per step, written by rank 0 only and flushed at every row (readable while training
    runs). On resume it is cut back to the checkpoint's step and continued."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, float]] = []
        self.fieldnames: list[str] | None = None
        self._file = None
        self._writer: csv.DictWriter | None = None
        if not enabled:
            return
        if resume_step and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames = list(reader.fieldnames or [])
                kept = [row for row in reader if int(row["step"]) <= resume_step]
            self.rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in kept]
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fieldnames)
                writer.writeheader()
                writer.writerows(kept)  # as written: the continued log reads like an uninterrupted one
            self._file = open(path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames, extrasaction="ignore")
        else:
            self._file = open(path, "w", newline="")

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if self._writer is None:  # the objectives' terms are known once the first step has run
            self.fieldnames = [*LOG_COLUMNS, *(k for k in row if k not in LOG_COLUMNS)]
            self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ------------------------------------------------------------------------------------------------ the stage
def train(cfg: Config, train_dir: str | os.PathLike, out_dir: str | os.PathLike,
          sink: MetricSink | None = None, start: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train a CLIP model on the shards in `train_dir`; write checkpoints, the final weights and a step log. With
    `model.init_from`, `start` holds its weights (lightclip_core.stages.start resolves them): the model's at step 0.

    Under torchrun (RANK/WORLD_SIZE set) every rank calls this; it joins the process group (gloo on CPU, NCCL on
    GPUs, failing after `train.dist_timeout_s` instead of hanging) and leaves it again if it joined it. A global
    batch that does not split over ranks and accumulation micro-steps is a ConfigError before any work."""
    world = world_from_env()
    local_batch_size(cfg, world.world_size)
    joined = world.distributed and not current_world().distributed
    world = init_from_env(cfg.train.dist_timeout_s)
    threads = torch.get_num_threads()  # train.threads applies to this stage only, not to its caller
    try:
        return _Trainer(cfg, Path(train_dir), Path(out_dir), sink, world, start).run()
    finally:
        torch.set_num_threads(threads)
        if joined:
            shutdown()


class _Trainer:
    def __init__(self, cfg: Config, train_dir: Path, out_dir: Path, sink: MetricSink | None, world: World,
                 start: dict[str, torch.Tensor] | None = None):
        self.cfg, self.train_dir, self.out_dir, self.world, self.start = cfg, train_dir, out_dir, world, start
        self.sink = sink if world.is_main else None
        self.ckpt_dir = out_dir / "checkpoints"

    def run(self) -> TrainResult:
        cfg, t, world = self.cfg, self.cfg.train, self.world
        if world.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if t.threads:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed, t.deterministic)  # the same initial weights on every rank
        device = device_for(world)

        manifest = read_manifest(self.train_dir)
        if len(manifest["shards"]) < world.world_size:
            raise ConfigError(f"--data {self.train_dir}: {len(manifest['shards'])} shards for {world.world_size} "
                              f"ranks; each rank reads whole shards, so the split needs at least one per rank")
        _, total_steps = plan_steps(cfg, manifest["num_samples"])
        model = build_model(cfg.model).to(device)
        start_model = load_start(model, self.start, cfg.model.start_source())  # before the objectives copy the model
        trim = model.ignores_padding()  # padding columns no caption uses are dropped where that is exact
        saved_start = {START_KEY: start_model} if start_model is not None else {}
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        model.visual.to(memory_format=memory_format)
        if t.grad_checkpointing:
            model.set_grad_checkpointing(True)
        objectives = build_objectives(cfg, model, reinforcement_of(self.train_dir)).to(device)
        loss_module = TrainingLoss(model, objectives)
        optimizer = build_optimizer(model, cfg, objectives)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        scheduler = build_scheduler(optimizer, t.warmup_steps, total_steps, t.schedule)
        loader, stream = make_loader(cfg, self.train_dir, world.rank, world.world_size,
                                     pin_memory=device.type == "cuda")
        fingerprint = train_fingerprint(cfg, manifest, world.world_size, start_model)

        state = self._resume_state(fingerprint)
        step = 0
        position = DataPosition()
        if state is not None:
            model.load_state_dict(state["model"])
            objectives.load_state_dict(state["objectives"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
            position = DataPosition.from_state(state["ranks"][world.rank]["data"])
        data = StepBatches(loader, stream, t.accum_steps, position, t.samples_per_epoch, t.batch_size)
        if data.steps_in_epoch(position.epoch) < 1:
            raise ConfigError(f"train.batch_size={t.batch_size}: no full step in an epoch with {world.world_size} "
                              f"rank(s) and {max(1, t.workers)} loader worker(s) per rank (each takes whole shards "
                              f"and drops its last partial micro-batch of {loader.batch_size}); use more shards or a "
                              f"smaller batch")

        wrapped: nn.Module = loss_module
        if world.distributed:
            wrapped = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=True)
        forward = torch.compile(wrapped) if t.compile else wrapped
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                    else contextlib.nullcontext())
        if world.is_main:
            log.info("training %s for %d steps, global batch %d (%d rank(s) x %d micro-step(s) x %d), on %s, "
                     "objectives %s%s", model_summary(model), total_steps, t.batch_size, world.world_size,
                     t.accum_steps, loader.batch_size, device, [o.name for o in objectives],
                     f", resuming after step {step}" if step else "")
        if state is not None:
            set_rng_state(state["ranks"][world.rank]["rng"])
        elif world.distributed:
            # per-rank randomness (e.g. dropout); MLM masks do not use it: they are keyed by global sample index
            seed_everything(f"{t.seed}/rank{world.rank}", t.deterministic)
        del state

        step_log = StepLog(self.out_dir / "train_log.csv", world.is_main, step)
        resumed_from = step
        model.train()
        objectives.train()
        started = time.perf_counter()
        tick = started
        try:
            with tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not world.is_main) as bar:
                while step < total_steps:
                    epoch, micro = data.next_step()
                    optimizer.zero_grad(set_to_none=True)
                    sums: dict[str, float] = {}
                    for i, batch in enumerate(micro):
                        images = batch["images"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
                        tokens = batch["tokens"]
                        tokens = (trim_padding(tokens) if trim else tokens).to(device, non_blocking=True)
                        extras = {k: batch[k].to(device, non_blocking=True) for k in EXTRA_KEYS if k in batch}
                        last = i == len(micro) - 1
                        # DDP averages gradients once per optimizer step, at the last micro-step's backward
                        sync = wrapped.no_sync() if world.distributed and not last else contextlib.nullcontext()
                        with sync:
                            with autocast:
                                loss, terms, outputs = forward(images, tokens, step, total_steps, extras)
                            if not math.isfinite(terms["loss"]):  # a global value: every rank stops here
                                raise TrainingDiverged(f"loss is {terms['loss']} at step {step + 1}; last good "
                                                       f"checkpoint kept in {self.ckpt_dir}")
                            (loss / len(micro)).backward()
                        for k, v in terms.items():
                            sums[k] = sums.get(k, 0.0) + v / len(micro)
                    if t.grad_clip:
                        nn.utils.clip_grad_norm_(parameters, t.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    loss_module.after_step()
                    step += 1

                    now = time.perf_counter()
                    row = {"step": step, "epoch": epoch, "loss": sums.pop("loss"), "lr": scheduler.get_last_lr()[-1],
                           "logit_scale": outputs["logit_scale"].item(), "samples_per_s": t.batch_size / (now - tick),
                           "samples_seen": step * t.batch_size, **sums}
                    tick = now
                    step_log.write(row)
                    if self.sink is not None and step % t.log_every == 0:
                        self.sink.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
                    bar.update()
                    if not world.distributed:
                        data.position.skips.check_running(cfg.data.max_skip_fraction, manifest["num_samples"],
                                                          f"--data {self.train_dir}")
                    if step % t.checkpoint_every == 0 and step < total_steps:
                        self._checkpoint(step, model, objectives, optimizer, scheduler, data, fingerprint,
                                         saved_start)
        finally:
            step_log.close()

        wall = time.perf_counter() - started
        final = self.out_dir / "final.pt"
        positions = all_gather_objects(data.position.state_dict())
        skips = ranks_skips(positions)
        skips.check(cfg.data.max_skip_fraction, f"--data {self.train_dir}")  # every rank: the same sum
        if world.is_main:
            save_checkpoint(final, {"model": model.state_dict(), "model_config": cfg.model.architecture(),
                                    "step": step, "lineage": training_lineage(cfg, manifest), **saved_start})
        rank_samples = [p["samples"] for p in positions]
        trained = step - resumed_from
        tail = step_log.rows[-min(len(step_log.rows), 20):]
        metrics = {
            "steps": float(step),
            "samples_seen": float(step * t.batch_size),
            "wall_time_s": wall,
            "samples_per_s": trained * t.batch_size / wall if trained else 0.0,
            "final_loss": float(np.mean([r["loss"] for r in tail])) if tail else float("nan"),
            "final_logit_scale": tail[-1]["logit_scale"] if tail else float("nan"),
            **skips.metrics(),
        }
        if world.is_main:
            log.info("trained %d steps (%d in this run) in %.1f s (%.1f samples/s), final loss %.4f; samples consumed "
                     "per rank %s", step, trained, wall, metrics["samples_per_s"], metrics["final_loss"], rank_samples)
        return TrainResult(final, step_log.path, step, step * t.batch_size, metrics, resumed_from)

    def _resume_state(self, fingerprint: str) -> dict[str, Any] | None:
        """The checkpoint state to continue from, the same on every rank (rank 0 chooses), or None."""
        chosen: str | None = None
        state: dict[str, Any] | None = None
        if self.world.is_main:
            remove_partial_writes(self.ckpt_dir)
            found = newest_valid_checkpoint(self.ckpt_dir) if self.cfg.train.resume else None
            if found is not None and found[1].get("fingerprint") == fingerprint:
                chosen, state = str(found[0]), found[1]
                log.info("resuming from %s (step %d)", found[0], int(state["step"]))
            elif found is not None or any(self.ckpt_dir.glob("step-*.pt*")):
                why = ("train.resume is false" if not self.cfg.train.resume else
                       "no valid checkpoint" if found is None else
                       f"{found[0].name} was written by a different training configuration (or world size)")
                self._set_aside(why)
        chosen = broadcast_object(chosen)
        if chosen is not None and state is None:
            state = load_checkpoint(chosen, require_checksum=True)
        return state

    def _set_aside(self, why: str) -> None:
        """Move old checkpoints out of the way of a fresh run (so that pruning cannot mix two runs)."""
        n = 0
        while (aside := self.out_dir / f"checkpoints.old-{n}").exists():
            n += 1
        os.replace(self.ckpt_dir, aside)
        self.ckpt_dir.mkdir()
        log.warning("starting fresh: %s; the old checkpoints were moved to %s", why, aside)

    def _checkpoint(self, step: int, model: nn.Module, objectives: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data: StepBatches, fingerprint: str, saved_start: dict[str, Any]) -> None:
        """Every rank contributes its RNG states and data position; rank 0 writes, then prunes. Past the skip limit
        (the ranks' counts summed) every rank stops here, before anything is written."""
        ranks = all_gather_objects({"rng": rng_state(), "data": data.position.state_dict()})
        t = self.cfg.train
        manifest_samples = sum(data.stream.sizes or [])
        ranks_skips([r["data"] for r in ranks]).check_running(self.cfg.data.max_skip_fraction, manifest_samples,
                                                              f"--data {self.train_dir}")
        if not self.world.is_main:
            return
        save_checkpoint(self.ckpt_dir / checkpoint_name(step), {
            "format": CHECKPOINT_FORMAT, "step": step, "epoch": data.position.epoch,
            "model": model.state_dict(), "objectives": objectives.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "model_config": self.cfg.model.architecture(), "fingerprint": fingerprint,
            "world_size": self.world.world_size, "samples_seen": step * t.batch_size, "ranks": ranks, **saved_start,
        })
        prune_checkpoints(self.ckpt_dir, t.keep_checkpoints)
