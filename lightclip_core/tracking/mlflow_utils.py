"""MLflow runs for stages: tracking URI resolution, lineage tags, flattened parameters, metrics and artifacts.

Stages never import mlflow: they get a :class:`StageRun` (or nothing) and call `log_metrics` / `log_artifact`.
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

from lightclip_core.config import Config, TrackingConfig

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on a parameter value


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `tracking.uri`, else a SQLite file `mlflow.db` in the repository."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def git_state(root: Path | None = None) -> dict[str, str]:
    """The commit and whether the work tree has uncommitted changes (empty when not a git repository)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return {}


def dvc_hash(path: str | os.PathLike) -> str:
    """The hash DVC records for a file or directory (`md5` or `md5.dir`), computed the same way DVC does."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), os.fspath(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go to `mlartifacts/` beside the database; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


class StageRun:
    """One MLflow run for one stage. Use as a context manager; with tracking disabled every call is a no-op.

    Tags: stage name, git commit and dirty flag, and the DVC hash of each input path.
    """

    def __init__(self, cfg: Config, stage: str, inputs: Mapping[str, str | os.PathLike] | None = None,
                 root: Path | None = None):
        self.cfg = cfg
        self.stage = stage
        self.inputs = dict(inputs or {})
        self.root = root
        self.enabled = cfg.tracking.enabled
        self.run_id: str | None = None

    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        import mlflow

        uri = tracking_uri(self.cfg.tracking, self.root)
        mlflow.set_tracking_uri(uri)
        name = self.cfg.tracking.experiment
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=_artifact_location(uri))
        mlflow.set_experiment(name)
        run = mlflow.start_run(run_name=self.stage)
        self.run_id = run.info.run_id
        tags = {"stage": self.stage, **git_state(self.root)}
        for label, path in self.inputs.items():
            if Path(path).exists():
                tags[f"dvc.input.{label}"] = f"{os.fspath(path)}:{dvc_hash(path)}"
        mlflow.set_tags(tags)
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in self.cfg.flat().items()}
        mlflow.log_params(params)
        log.info("MLflow run %s (%s) at %s", self.run_id, self.stage, uri)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items()}, step=step, synchronous=False)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(os.fspath(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(os.fspath(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics, _ - . space / ; "R@1" is not allowed, so spell it out
    return key.replace("@", "_at_")
