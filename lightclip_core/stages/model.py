"""The model stages: train the student, then fold and export it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightclip_core.config import Config
from lightclip_core.infra import storage
from lightclip_core.stages.io import flat_numbers, local_dir, local_file, output_dir
from lightclip_core.tracking.mlflow_utils import StageRun

FINAL = "final.pt"


@dataclass
class TrainSummary:
    checkpoint: str
    metrics: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, **self.metrics}


def run_train(*, cfg: Config, data: str | os.PathLike, out: str | os.PathLike) -> TrainSummary:
    """Train on the (prepared or reinforced) split `data`. Under `torchrun --nproc-per-node N` every rank calls
    this; rank 0 alone tracks the run, writes `out/metrics.json` and, for an `s3://` `out`, publishes the local
    output directory (kept in the fetch cache, so a restarted job resumes from its checkpoints) with `final.pt`
    last."""
    from lightclip_core.infra.distributed import world_from_env
    from lightclip_core.train.trainer import train

    train_dir = local_dir(data, "training split", "data")
    remote = str(out) if storage.is_s3(str(out)) else None
    local = storage.default_cache_dir() / "train-out" / storage.split_s3(remote)[1].strip("/") if remote else Path(out)
    if not world_from_env().is_main:
        result = train(cfg, train_dir, local)
        return TrainSummary(str(result.final_checkpoint), result.metrics)
    with StageRun(cfg, "train", inputs={"data": train_dir}) as run:
        result = train(cfg, train_dir, local, sink=run)
        run.log_metrics({f"summary/{k}": v for k, v in result.metrics.items()})
        run.log_artifact(result.train_log)
    storage.write_json_atomic(local / "metrics.json", result.metrics)
    if remote:
        storage.publish_dir(local, remote, last=(FINAL,))
    return TrainSummary(storage.join(remote, FINAL) if remote else str(result.final_checkpoint), result.metrics)


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

    final = local_file(checkpoint, "checkpoint", "checkpoint")
    with StageRun(cfg, "export", inputs={"checkpoint": final}) as run, \
            output_dir(out, "export", last=("config.json",)) as local:
        result = export(cfg, final, local)
        run.log_metrics({f"parity/{k}": v for k, v in flat_numbers(result.parity).items()})
        run.log_artifact(local / "config.json")
    return ExportSummary(str(out), result.parity)
