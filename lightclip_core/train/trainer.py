"""The training stage: setup, loop, log, checkpoint.

Objectives are modules returning named terms (losses/base.py); the trainer sums every `*_loss` term times its
objective's weight and logs every term. Objective parameters train with the model but stay out of `final.pt`.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lightclip_core.config import Config
from lightclip_core.data.shards import read_manifest
from lightclip_core.data.tokenizer import trim_padding
from lightclip_core.losses import StepContext
from lightclip_core.losses.build import build_objectives, forward_needs
from lightclip_core.models import build_model, model_summary
from lightclip_core.train.data import EXTRA_KEYS, batches, make_loader, reinforcement_of
from lightclip_core.train.checkpoint import checkpoint_name, prune_checkpoints, save_checkpoint
from lightclip_core.train.schedule import build_scheduler

log = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "epoch", "loss", "lr", "logit_scale", "samples_per_s")  # then every objective term


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    final_checkpoint: Path
    train_log: Path
    steps: int
    samples_seen: int
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_optimizer(model: nn.Module, cfg: Config, objectives: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings or the temperature), over the
    model and the objectives' own parameters."""
    t = cfg.train
    skip = model.no_weight_decay()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if objectives is not None:
        named += [(f"objectives.{n}", p) for n, p in objectives.named_parameters() if p.requires_grad]
        skip = skip | {f"objectives.{n}" for n, p in objectives.named_parameters() if p.ndim < 2}
    decay = [p for n, p in named if n not in skip]
    no_decay = [p for n, p in named if n in skip]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def plan_steps(cfg: Config, num_samples: int) -> tuple[int, int]:
    """(steps per epoch, total steps). Every step sees a full batch (the last partial batch is dropped)."""
    steps_per_epoch = num_samples // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={cfg.train.batch_size}: larger than the training split ({num_samples})")
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    return steps_per_epoch, total


def compute_loss(model: nn.Module, objectives: nn.ModuleList, images: torch.Tensor, tokens: torch.Tensor,
                 step: int, total_steps: int, extras: dict[str, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float], dict[str, Any]]:
    """One forward pass and every objective: (weighted total loss, every term as a float, model outputs).
    `extras` are the batch's other fields (a reinforced split's teacher embeddings and synthetic captions)."""
    outputs = model(images, tokens, **forward_needs(objectives))
    ctx = StepContext(step=step, total_steps=total_steps, images=images, tokens=tokens, model=model,
                      extras=extras or {})
    total = images.new_zeros(())
    terms: dict[str, float] = {}
    for objective in objectives:
        named = objective(outputs, ctx)
        total = total + objective.weight * sum(v for k, v in named.items() if k.endswith("_loss"))
        terms.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in named.items()})
    return total, terms, outputs


def train(cfg: Config, train_dir: str | os.PathLike, out_dir: str | os.PathLike,
          sink: MetricSink | None = None) -> TrainResult:
    """Train a CLIP model on the shards in `train_dir`; write checkpoints, the final weights and a step log."""
    t = cfg.train
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed, t.deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    num_samples = read_manifest(train_dir)["num_samples"]
    steps_per_epoch, total_steps = plan_steps(cfg, num_samples)
    model = build_model(cfg.model).to(device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model.visual.to(memory_format=memory_format)
    objectives = build_objectives(cfg, model, reinforcement_of(train_dir)).to(device)
    optimizer = build_optimizer(model, cfg, objectives)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = build_scheduler(optimizer, t.warmup_steps, total_steps)
    loader, stream = make_loader(cfg, train_dir)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                else contextlib.nullcontext())
    log.info("training %s for %d steps (%d per epoch), batch %d, on %s, objectives %s", model_summary(model),
             total_steps, steps_per_epoch, t.batch_size, device, [o.name for o in objectives])

    log_path = out_dir / "train_log.csv"
    rows: list[dict[str, float]] = []
    model.train()
    objectives.train()
    started = time.perf_counter()
    tick = started
    step = 0
    with open(log_path, "w", newline="") as log_file, tqdm(total=total_steps, desc="train", unit="step") as bar:
        writer: csv.DictWriter | None = None
        for epoch, batch in batches(loader, stream, total_steps):
            images = batch["images"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            tokens = trim_padding(batch["tokens"]).to(device, non_blocking=True)
            extras = {k: batch[k].to(device, non_blocking=True) for k in EXTRA_KEYS if k in batch}
            with autocast:
                loss, terms, outputs = compute_loss(model, objectives, images, tokens, step, total_steps, extras)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at step {step + 1}; last good checkpoint kept in {ckpt_dir}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                nn.utils.clip_grad_norm_(parameters, t.grad_clip)
            optimizer.step()
            scheduler.step()
            for objective in objectives:
                objective.after_step(model)
            step += 1

            now = time.perf_counter()
            row = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                   "logit_scale": outputs["logit_scale"].item(), "samples_per_s": t.batch_size / (now - tick),
                   **terms}
            tick = now
            rows.append(row)
            if writer is None:  # the objectives' terms are known once the first step has run
                writer = csv.DictWriter(log_file, fieldnames=[*LOG_COLUMNS, *terms], extrasaction="ignore")
                writer.writeheader()
            writer.writerow(row)
            log_file.flush()  # the log is readable while training runs
            if sink is not None and step % t.log_every == 0:
                sink.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            bar.update()
            if step % t.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(ckpt_dir / checkpoint_name(step), {
                    "model": model.state_dict(), "objectives": objectives.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                    "model_config": cfg.model.model_dump(mode="json"),
                })
                prune_checkpoints(ckpt_dir, t.keep_checkpoints)

    wall = time.perf_counter() - started
    final = save_checkpoint(out_dir / "final.pt", {
        "model": model.state_dict(), "model_config": cfg.model.model_dump(mode="json"), "step": step})
    tail = rows[-min(len(rows), 20):]
    metrics = {
        "steps": float(step),
        "samples_seen": float(step * t.batch_size),
        "wall_time_s": wall,
        "samples_per_s": step * t.batch_size / wall,
        "final_loss": float(np.mean([r["loss"] for r in tail])),
        "final_logit_scale": tail[-1]["logit_scale"],
    }
    log.info("trained %d steps in %.1f s (%.1f samples/s), final loss %.4f", step, wall, metrics["samples_per_s"],
             metrics["final_loss"])
    return TrainResult(final, log_path, step, step * t.batch_size, metrics)
