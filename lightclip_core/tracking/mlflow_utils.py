"""MLflow runs for stages: tracking URI resolution, the pipeline parent run, lineage tags, flattened parameters,
dataset inputs, metrics and artifacts that survive an outage of the tracking server, and system metrics.

Stages never import mlflow: they get a :class:`StageRun` (or nothing) and call `log_metrics` / `log_artifact`.

Run layout: one parent run per pipeline execution (tag `lightclip.role=pipeline`), one child run per stage. The
execution is identified by `$LIGHTCLIP_PIPELINE_RUN`, else `$KFP_RUN_ID`, else, under `dvc repro` / `dvc exp run`,
by the DVC process that runs the stages. Without any of them a stage run has no parent.

A run records the process that owns it; a stage first ends, as KILLED, the runs of its experiment whose owner died
without ending them (:mod:`lightclip_core.tracking.liveness`). Credentials in a URI are masked wherever it is shown:
parameters, tags, log lines and messages (:func:`lightclip_core.infra.storage.redact_uri`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from lightclip_core.config import Config, TrackingConfig
from lightclip_core.tracking.liveness import Heartbeat, end_abandoned_runs, owner_tags
from lightclip_core.tracking.spool import Outbox, TrackingUnavailable, first_line, quiet_http_retries, redact_uri

log = logging.getLogger(__name__)

__all__ = ["StageRun", "TrackingUnavailable", "tracking_uri", "check_reachable", "pipeline_id", "git_state",
           "dvc_hash", "manifest_digest", "metric_key"]

PIPELINE_ENV = "LIGHTCLIP_PIPELINE_RUN"
KFP_ENV = "KFP_RUN_ID"
ORCHESTRATOR_ENV = "LIGHTCLIP_ORCHESTRATOR"
ROLE_TAG, PIPELINE_TAG, KFP_TAG = "lightclip.role", "lightclip.pipeline_id", "kfp.run_id"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI opens such an experiment on its training runs
_MAX_PARAM_LEN = 6000  # MLflow's limit on a parameter value
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit on parameters in one log_batch call
_DIGEST_LEN = 32  # MLflow stores dataset digests in 36 characters
_HEALTH_TIMEOUT_S = 5.0
# Bounded retries (about 10 s per request instead of minutes) so that the delivery thread notices an outage
# and a returning server quickly; its own retry loop takes over from there. Stdout stays the command's JSON summary
# (MLflow would print run links there from the delivery thread). Set these variables to override.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}


# -------------------------------------------------------------------------------------------- locations
def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `tracking.uri`, else a SQLite file `mlflow.db` in the repository."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def experiment_page(ui: str, experiment_id: str) -> str:
    """The address of an experiment's training-runs table in the MLflow UI. MLflow 3's UI opens an experiment on
    its GenAI overview unless the address (or the browser's remembered sidebar switch) asks for model training."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment_url(cfg: TrackingConfig, ui: str, root: Path | None = None) -> str | None:
    """The runs table of `cfg.experiment` in the UI at `ui`; None while the experiment does not exist yet."""
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri(cfg, root)).get_experiment_by_name(cfg.experiment)
    return experiment_page(redact_uri(ui), experiment.experiment_id) if experiment is not None else None


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go to `mlartifacts/` beside the database; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = _HEALTH_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailable` at once if an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return  # a local store: nothing to reach
    import requests

    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or \
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=verify)
    except requests.RequestException as err:
        raise TrackingUnavailable(f"tracking server {redact_uri(uri)} is unreachable ({type(err).__name__}); "
                                  "start it, or point "
                                  f"MLFLOW_TRACKING_URI at a running one (docs/TRACKING.md)") from None
    if response.status_code >= 500:
        raise TrackingUnavailable(f"tracking server {redact_uri(uri)} is unhealthy "
                                  f"(HTTP {response.status_code} on /health)")


def _client_defaults() -> None:
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    quiet_http_retries()


# ---------------------------------------------------------------------------------------------- lineage
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


def manifest_digest(dataset_dir: str | os.PathLike) -> str:
    """sha256 of a dataset's `manifest.json`, which lists the sha256 of every shard: it pins the whole dataset."""
    return hashlib.sha256((Path(dataset_dir) / "manifest.json").read_bytes()).hexdigest()


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", text)[:200]


def _dvc_invocation() -> str | None:
    """An id of the `dvc repro` / `dvc exp run` process that runs this stage: the nearest `dvc` ancestor."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            if any(Path(arg).name == "dvc" for arg in proc.cmdline()[:3]):
                return f"dvc-{socket.gethostname()}-{proc.pid}-{int(proc.create_time() * 1000)}"
            proc = proc.parent()
    except psutil.Error:
        pass
    return None


def pipeline_id() -> str | None:
    """The pipeline execution this process belongs to (see the module docstring), or None."""
    for name in (PIPELINE_ENV, KFP_ENV):
        if os.environ.get(name):
            return _safe_id(os.environ[name])
    return _dvc_invocation() if os.environ.get("DVC_STAGE") else None


def orchestration_tags() -> dict[str, str]:
    """Who runs the stage: `$LIGHTCLIP_ORCHESTRATOR` (the Kubeflow components set `kfp`, also for the cached, run-
    independent steps that get no KFP run id), else kfp / dvc / manual from the environment."""
    tags = {"lightclip.orchestrator": os.environ.get(ORCHESTRATOR_ENV) or ("kfp" if os.environ.get(KFP_ENV) else
            "dvc" if os.environ.get("DVC_STAGE") else "manual")}
    if os.environ.get(KFP_ENV):
        tags[KFP_TAG] = os.environ[KFP_ENV]
    return tags


def metric_key(key: str) -> str:
    """MLflow allows alphanumerics, _ - . space / in keys; "R@1" is not allowed, so spell it out."""
    return key.replace("@", "_at_")


# -------------------------------------------------------------------------------------------- MLflow calls
def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if needed, marked as model training so that MLflow's UI opens it on its runs
    (MLflow 3 opens an unmarked experiment on its GenAI traces overview)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # another stage created it in the meantime
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact_uri(str(v))[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + _MAX_PARAMS_PER_BATCH])


def _pipeline_runs(client: Any, experiment_id: str, pid: str) -> list[Any]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and "
                              f"tags.`{ROLE_TAG}` = 'pipeline'", max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def find_or_create_pipeline_run(client: Any, experiment_id: str, pid: str, tags: dict[str, str],
                                params: dict[str, Any]) -> str:
    """The parent run of pipeline execution `pid`, created by the first stage that gets here."""
    runs = _pipeline_runs(client, experiment_id, pid)
    if not runs:
        name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
        created = client.create_run(experiment_id, run_name=name, tags={**tags, ROLE_TAG: "pipeline",
                                                                        PIPELINE_TAG: pid})
        _log_params(client, created.info.run_id, params)
        # Stages that start together (a Kubeflow ParallelFor) may each create one: all keep the oldest.
        runs = _pipeline_runs(client, experiment_id, pid)
        if runs[0].info.run_id != created.info.run_id:
            client.delete_run(created.info.run_id)
    parent = runs[0].info.run_id
    client.update_run(parent, status="RUNNING")
    return parent


def dataset_inputs(inputs: Mapping[str, str | os.PathLike]) -> list[Any]:
    """MLflow dataset inputs for the inputs that are datasets (directories with a manifest.json)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    found = []
    for label, path in inputs.items():
        manifest_path = Path(path) / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        split = str(manifest.get("split", label))
        source = (manifest.get("params") or {}).get("source", "dataset")
        dataset = Dataset(
            name=f"{source}-{split}", digest=manifest_digest(path)[:_DIGEST_LEN], source_type="local",
            source=json.dumps({"uri": Path(path).resolve().as_uri()}),
            profile=json.dumps({"num_samples": manifest.get("num_samples"), "num_shards": len(manifest["shards"]),
                                "tasks": sorted(manifest.get("tasks") or {})}))
        context = _SPLIT_CONTEXT.get(split, split)
        found.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return found


def input_tags(inputs: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """The DVC hash of every input and the manifest digest of every dataset input."""
    tags: dict[str, str] = {}
    for label, path in inputs.items():
        if Path(path).exists():
            tags[f"dvc.input.{label}"] = f"{os.fspath(path)}:{dvc_hash(path)}"
        if (Path(path) / "manifest.json").is_file():
            tags[f"data.{label}.manifest_sha256"] = manifest_digest(path)
    return tags


def _redacted(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: redact_uri(str(v)) for k, v in tags.items()}


# ------------------------------------------------------------------------------------------------ the run
class StageRun:
    """One MLflow run for one stage, nested under the pipeline run. Use as a context manager; with tracking
    disabled every call is a no-op.

    Entering checks that the server answers and creates the run (tags: stage, lineage, orchestration; the
    flattened parameters; dataset inputs); any failure there raises :class:`TrackingUnavailable` before the stage
    does any work. From then on nothing waits for the server: operations go through a spool (see
    :mod:`lightclip_core.tracking.spool`).
    """

    def __init__(self, cfg: Config, stage: str, inputs: Mapping[str, str | os.PathLike] | None = None,
                 root: Path | None = None):
        self.cfg = cfg
        self.stage = stage
        self.inputs = dict(inputs or {})
        self.root = root
        self.enabled = cfg.tracking.enabled
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self.undelivered = 0
        self._outbox: Outbox | None = None
        self._sampler: Any = None
        self._heartbeat: Heartbeat | None = None

    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        self.uri = tracking_uri(self.cfg.tracking, self.root)
        check_reachable(self.uri)
        _client_defaults()
        try:
            self._create_run()
        except TrackingUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - one line before any work, whatever MLflow raised
            raise TrackingUnavailable(f"tracking at {redact_uri(self.uri)}: cannot start the {self.stage} run: "
                                      f"{first_line(err)}") from None
        self._outbox = Outbox(self.root_path(self.cfg.tracking.spool_dir), self.run_id, self.uri,
                              self.parent_run_id)
        self._heartbeat = Heartbeat(self.uri, self.run_id)
        if self.cfg.tracking.system_metrics_interval_s > 0:
            from lightclip_core.tracking.system_metrics import SystemMetricsSampler

            self._sampler = SystemMetricsSampler(lambda m, step: self.log_metrics(m, step=step),
                                                 self.cfg.tracking.system_metrics_interval_s)
        shown = redact_uri(self.uri)
        where = (f"{shown.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
                 if shown.startswith("http") else shown)
        log.info("MLflow run %s (%s) at %s%s", self.run_id, self.stage, where,
                 f", pipeline run {self.parent_run_id}" if self.parent_run_id else "")
        return self

    def root_path(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else (self.root or Path.cwd()) / path

    def _create_run(self) -> None:
        from mlflow import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        client = MlflowClient(self.uri)
        self.experiment_id = _experiment_id(client, self.cfg.tracking.experiment, self.uri)
        try:  # before this stage sets its pipeline run RUNNING again
            end_abandoned_runs(client, self.experiment_id, self.root_path(self.cfg.tracking.spool_dir))
        except Exception as err:  # noqa: BLE001 - housekeeping never stops a stage
            log.warning("could not look for abandoned runs: %s", first_line(err))
        params = self.cfg.flat()
        common = _redacted(resolve_tags({**git_state(self.root), **orchestration_tags()}))
        pid = pipeline_id()
        tags = {**common, **_redacted(input_tags(self.inputs)), **owner_tags(), "stage": self.stage,
                ROLE_TAG: "stage"}
        if pid:
            self.parent_run_id = find_or_create_pipeline_run(client, self.experiment_id, pid, common, params)
            tags.update({PARENT_TAG: self.parent_run_id, PIPELINE_TAG: pid})
        run = client.create_run(self.experiment_id, run_name=self.stage, tags=tags)
        self.run_id = run.info.run_id
        _log_params(client, self.run_id, params)
        datasets = dataset_inputs(self.inputs)
        if datasets:
            client.log_inputs(self.run_id, datasets=datasets)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled or self._outbox is None:
            return
        if self._sampler is not None:
            self._sampler.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        status = "FAILED" if exc_type else "FINISHED"
        self._outbox.put({"op": "end", "status": status, "end_time": int(time.time() * 1000),
                          "parent_run_id": self.parent_run_id})
        outbox, self._outbox = self._outbox, None  # later calls are no-ops, as with tracking disabled
        self.undelivered = outbox.close(self.cfg.tracking.flush_timeout_s)
        if self.undelivered:
            log.warning("tracking server unreachable: %d operations of run %s are kept in %s; run "
                        "`lightclip tracking sync` when it is back", self.undelivered, self.run_id,
                        outbox.journal.path)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._outbox is not None:
            now = int(time.time() * 1000)
            items = [[metric_key(k), float(v), now, int(step or 0)] for k, v in metrics.items()]
            self._outbox.put({"op": "metrics", "metrics": items})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self._outbox is not None:
            self._outbox.spool_artifact(Path(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._outbox is not None:
            self._outbox.put({"op": "tags", "tags": _redacted(tags)})
