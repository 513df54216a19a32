"""The closing stages: evaluate the export on the test split, then register it in MLflow behind the gate."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lightclip_core.config import Config
from lightclip_core.infra import storage
from lightclip_core.register.registration import RegisterResult, gate_passes, read_inputs, register, skipped
from lightclip_core.stages.io import (InputError, existing, local_dir, localise, output_dir, output_location,
                                      split_manifest, split_of)
from lightclip_core.tracking.mlflow_utils import StageRun

EXPORT_CONFIG = "config.json"  # written last by the export
METRICS = "metrics.json"  # written last by the evaluation


@dataclass
class EvaluateSummary:
    out: str
    metrics: dict[str, float]

    def summary(self) -> dict[str, float]:
        return self.metrics


def benchmark_location(uri: str, what: str) -> Path:
    """A benchmark set's file or folder as a local path: an `s3://` object or prefix is fetched to the cache (reused
    by ETag); a local path is itself, whether it exists or not (the set's checks say what is missing)."""
    if not storage.is_s3(uri):
        return Path(uri)
    if what == "dir":
        return localise(uri)
    if not storage.exists(uri):
        raise InputError(f"evaluate.benchmarks: {storage.redact_uri(uri)!r} does not exist")
    return storage.fetch_to_local(uri, storage.default_cache_dir())


def run_evaluate(*, cfg: Config, model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                 train_log: str | os.PathLike | None = None) -> EvaluateSummary:
    """Zero-shot classification and retrieval of the export `model` on the test split `data` (a prepared root: its
    test/) and on the benchmark sets of `evaluate.benchmarks` (local or `s3://`); metrics, per-class results, plots
    and the report land in `out` (`metrics.json` published last)."""
    from lightclip_core.evaluate.benchmarks import open_benchmarks
    from lightclip_core.evaluate.evaluation import check_wise_ft, evaluate, select_tasks

    output_location(out, "evaluation directory")
    storage.sweep_stale_tmp(out)
    export_dir = local_dir(model, "export directory", "model", marker=EXPORT_CONFIG)
    data = split_of(data, "test")
    test_dir = local_dir(data, "test split", "data")
    select_tasks(split_manifest(test_dir, "test split", "data", data), cfg.evaluate.tasks, data)  # before the run
    log = existing(train_log, "training log", "train_log") if train_log else None
    check_wise_ft(cfg, export_dir)
    benchmarks = open_benchmarks(cfg.evaluate.benchmarks, cfg.evaluate.templates, benchmark_location)
    with StageRun(cfg, "evaluate", inputs={"model": export_dir, "data": test_dir}) as run, \
            output_dir(out, "evaluate", last=(METRICS,)) as local:
        result = evaluate(cfg, export_dir, test_dir, local, train_log=log, benchmarks=benchmarks)
        run.log_metrics({**result.metrics, **result.skipped})
        run.log_artifact(local)
    return EvaluateSummary(str(out), {**result.metrics, **result.skipped})  # skipped/...: the summary, not metrics.json


def run_register(*, cfg: Config, model: str | os.PathLike, eval: str | os.PathLike, out: str | os.PathLike,
                 train_data: str | os.PathLike | None = None, test_data: str | os.PathLike | None = None,
                 train_log: str | os.PathLike | None = None) -> RegisterResult:
    """Register the evaluated export in the MLflow registry and move `champion` when it beats the current one;
    skipped (with the reason) when the registry or tracking is off or the evaluation gate fails. The decision and
    the report land in the local directory `out`."""
    output_location(out, "registration directory")
    storage.sweep_stale_tmp(out)
    export_dir = local_dir(model, "export directory", "model", marker=EXPORT_CONFIG)
    eval_dir = local_dir(eval, "evaluation directory", "eval", marker=METRICS)
    inputs = read_inputs(cfg, export_dir, eval_dir, train_data, test_data, train_log)
    if not (cfg.registry.enabled and cfg.tracking.enabled):
        return skipped(cfg, inputs, out, "registry.enabled is false" if not cfg.registry.enabled
                       else "tracking.enabled is false")
    passed, why = gate_passes(cfg, inputs.metrics)
    if not passed:
        return skipped(cfg, inputs, out, why)
    labelled = {"model": export_dir, "eval": eval_dir, "train_data": inputs.train_data, "test_data": inputs.test_data}
    with StageRun(cfg, "register", inputs={k: v for k, v in labelled.items() if v is not None}) as run:
        return register(cfg, inputs, out, run)
