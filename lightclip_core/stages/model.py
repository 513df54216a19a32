"""The model stages: train the student, then fold and export it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightclip_core.config import Config
from lightclip_core.infra import storage
from lightclip_core.stages.io import (InputError, flat_numbers, local_dir, local_file, output_dir, output_location,
                                      split_manifest, split_of)
from lightclip_core.stages.start import FINAL, read_checkpoint, start_weights
from lightclip_core.tracking.mlflow_utils import StageRun


@dataclass
class TrainSummary:
    checkpoint: str
    metrics: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, **self.metrics}


def run_train(*, cfg: Config, data: str | os.PathLike, out: str | os.PathLike) -> TrainSummary:
    """Train on the (prepared or reinforced) split `data` (a prepared root: its train/). Under `torchrun
    --nproc-per-node N` every rank calls this; rank 0 alone tracks the run, writes `out/metrics.json` and, for an
    `s3://` `out`, publishes the local output directory (kept in the fetch cache, so a restarted job resumes from its
    checkpoints) with `final.pt` last. `model.init_from` is resolved and checked here, before the run opens."""
    from lightclip_core.infra.distributed import world_from_env
    from lightclip_core.train.trainer import train

    data = split_of(data, "train")
    train_dir = local_dir(data, "training split", "data")
    _check_train_inputs(cfg, train_dir, data, out)
    start = start_weights(cfg)
    remote = str(out) if storage.is_s3(str(out)) else None
    local = storage.default_cache_dir() / "train-out" / storage.split_s3(remote)[1].strip("/") if remote else Path(out)
    storage.sweep_stale_tmp(local)
    if not world_from_env().is_main:
        result = train(cfg, train_dir, local, start=start)
        return TrainSummary(str(result.final_checkpoint), result.metrics)
    with StageRun(cfg, "train", inputs={"data": train_dir}) as run:
        result = train(cfg, train_dir, local, sink=run, start=start)
        run.log_metrics({f"summary/{k}": v for k, v in result.metrics.items()})
        run.log_artifact(result.train_log)
    storage.write_json_atomic(local / "metrics.json", result.metrics)
    if remote:
        storage.publish_dir(local, remote, last=(FINAL,))
    return TrainSummary(storage.join(remote, FINAL) if remote else str(result.final_checkpoint), result.metrics)


def _check_train_inputs(cfg: Config, train_dir: Path, data: str | os.PathLike, out: str | os.PathLike) -> None:
    """What training needs of its inputs, checked on every rank before the MLflow run and before any directory: a
    split with at least one global batch and one shard per rank, a batch that splits over ranks and micro-steps, a
    reinforced split where the objectives or stored views need one, and a local `out` that can be written."""
    from lightclip_core.infra.distributed import world_from_env
    from lightclip_core.train.data import local_batch_size, reinforcement_of, require_reinforcement

    manifest = split_manifest(train_dir, "training split", "data", data)
    world_size = world_from_env().world_size
    local_batch_size(cfg, world_size)
    samples, shards = manifest["num_samples"], len(manifest["shards"])
    if samples < cfg.train.batch_size:
        raise InputError(f"train.batch_size={cfg.train.batch_size}: larger than the training split --data="
                         f"{str(data)!r} ({samples} samples); allowed: at most {samples}")
    if shards < world_size:
        raise InputError(f"--data={str(data)!r}: {shards} shards for {world_size} ranks; each rank reads whole "
                         f"shards, so the split needs at least one per rank")
    if cfg.objectives.distill.enabled:
        require_reinforcement(train_dir)
    elif cfg.train.stored_views and reinforcement_of(train_dir) is not None:
        require_reinforcement(train_dir, "train.stored_views=true")
    output_location(out, "training output")


@dataclass
class ExportSummary:
    out: str
    parity: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"out": self.out, "parity": self.parity}


def run_export(*, cfg: Config, checkpoint: str | os.PathLike, out: str | os.PathLike) -> ExportSummary:
    """Fold the reparameterizable blocks of the trained `checkpoint` and export the model to `out` (safetensors,
    torch.export, ONNX), parity-checked; `config.json` is written (and published) last."""
    from lightclip_core.export.exporter import export

    output_location(out, "export directory")
    storage.sweep_stale_tmp(out)
    final = local_file(checkpoint, "checkpoint", "checkpoint")
    if cfg.export.wise_ft_alpha != 1:  # interpolating needs the start weights: checked before the run opens
        from lightclip_core.export.exporter import wise_ft_start

        wise_ft_start(cfg, read_checkpoint(final, f"--checkpoint={str(checkpoint)!r}", "allowed: a final.pt of "
                                           "`train`"), checkpoint)
    with StageRun(cfg, "export", inputs={"checkpoint": final}) as run, \
            output_dir(out, "export", last=("config.json",)) as local:
        result = export(cfg, final, local)
        run.log_metrics({f"parity/{k}": v for k, v in flat_numbers(result.parity).items()})
        run.log_artifact(local / "config.json")
    return ExportSummary(str(out), result.parity)
