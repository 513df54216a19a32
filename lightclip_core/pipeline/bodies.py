"""The bodies of the Kubeflow components: each picks its stage's locations in object storage, calls the same stage
function as `lightclip <stage>` (lightclip_core.stages: same validation, same MLflow run, inputs localised and
outputs published there) and fills its typed KFP artifacts.

Large data never travels as a KFP artifact: a Dataset artifact holds the split's `manifest.json` and, in its metadata,
the URI of the shards; a Model artifact holds the small descriptive files and the URI of the weights. Locations are
content-addressed for the pure stages (data, teacher, reinforcement: the fingerprint of the parameters they read), so
KFP's cache and a rerun find the same objects, and run-scoped (`runs/<KFP run id>/`) for training and after.

Artifacts are duck-typed here (`.path`, `.metadata`, `.log_metric`, `.log_confusion_matrix`): lightclip_core does not
import kfp at run time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lightclip_core import stages
from lightclip_core.config import Config, validate
from lightclip_core.infra import storage
from lightclip_core.stages.io import MANIFEST, workdir
from lightclip_core.stages.params import stage_fingerprint
from lightclip_core.tracking.mlflow_utils import KFP_ENV as RUN_ENV, ORCHESTRATOR_ENV

URI = "uri"
LOCATIONS = {"prepare": "data", "teacher": "teacher", "reinforce": "reinforced"}  # pure stages' folders


# --------------------------------------------------------------------------------------------------- helpers
def load(params: str, run_id: str | None = None) -> Config:
    """The run's configuration (validated again: a component may be started by hand). The MLflow runs of the
    run-scoped stages are grouped under the KFP run (`run_id`); the pure, cached stages get none, since their
    output is shared by every run with the same parameters."""
    os.environ[ORCHESTRATOR_ENV] = "kfp"
    if run_id:
        os.environ[RUN_ENV] = run_id
    return validate(json.loads(params))


def describe_dataset(artifact: Any, uri: str) -> None:
    """A Dataset artifact: the split's manifest (a copy) and where its shards are."""
    Path(artifact.path).mkdir(parents=True, exist_ok=True)
    storage.download_file(storage.join(uri, MANIFEST), Path(artifact.path) / MANIFEST)
    manifest = json.loads((Path(artifact.path) / MANIFEST).read_text())
    artifact.metadata.update({URI: uri, "num_samples": manifest.get("num_samples"),
                              "shards": len(manifest.get("shards", []))})


def describe_files(artifact: Any, uri: str, names: list[str], **metadata: Any) -> None:
    """A Model-like artifact: copies of a few small files of `uri` and the URI of the whole directory."""
    Path(artifact.path).mkdir(parents=True, exist_ok=True)
    for name in names:
        if storage.exists(storage.join(uri, name)):
            storage.download_file(storage.join(uri, name), Path(artifact.path) / name)
    artifact.metadata.update({URI: uri, **metadata})


def uri_of(artifact: Any) -> str:
    return artifact.metadata[URI]


def pure_uri(cfg: Config, storage_root: str, stage: str, *parts: str) -> str:
    """Where a pure (cached) stage's output lives: content-addressed by every parameter it depends on."""
    return storage.join(storage_root, LOCATIONS[stage], stage_fingerprint(cfg, stage), *parts)


def run_prefix(storage_root: str, run_id: str, stage: str) -> str:
    return storage.join(storage_root, "runs", run_id or "manual", stage)


# ---------------------------------------------------------------------------------------------------- bodies
def prepare(params: str, storage_root: str, train: Any, test: Any) -> None:
    """Generate or ingest the dataset into `<root>/data/<fingerprint>/{train,val,test}`."""
    cfg = load(params)
    base = pure_uri(cfg, storage_root, "prepare")
    stages.run_prepare(cfg=cfg, out=base)
    describe_dataset(train, storage.join(base, "train"))
    describe_dataset(test, storage.join(base, "test"))


def teacher(params: str, storage_root: str, train: Any, model: Any) -> None:
    """Train the embedded default's teachers (CoCa captioner + second CLIP) on the training split."""
    cfg = load(params)
    uri = pure_uri(cfg, storage_root, "teacher")
    result = stages.run_teacher(cfg=cfg, data=uri_of(train), out=uri)
    describe_files(model, uri, ["metrics.json"], models=result.models)


def shard_groups(train: Any, groups: int) -> list[str]:
    """`groups` contiguous, near-equal shard ranges `A:B` of the training split (fewer when it has fewer shards)."""
    count = len(json.loads((Path(train.path) / MANIFEST).read_text())["shards"])
    groups = max(1, min(groups, count))
    bounds = [round(i * count / groups) for i in range(groups + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def reinforce_group(params: str, storage_root: str, train: Any, teacher_model: Any, shards: str) -> str:
    """One worker of the fan-out: reinforce shards `A:B` into the reinforced prefix, without the manifest, which
    :func:`publish_reinforced` publishes once, after every group."""
    cfg = load(params)
    stages.run_reinforce(cfg=cfg, data=uri_of(train), teacher=uri_of(teacher_model),
                         out=pure_uri(cfg, storage_root, "reinforce", "train"), shards=shards, publish=False)
    return shards


def publish_reinforced(params: str, storage_root: str, train: Any, teacher_model: Any, reinforced: Any) -> None:
    """The join after the fan-out, once (the entries name the teachers by the same local path every group used: the
    fetch cache's); a missing shard fails the task."""
    cfg = load(params)
    uri = pure_uri(cfg, storage_root, "reinforce", "train")
    result = stages.run_publish_reinforced(cfg=cfg, data=uri_of(train), teacher=uri_of(teacher_model), out=uri)
    if not result.complete:
        raise RuntimeError(f"{uri}: reinforcement incomplete after every group: {result.missing_shards} shards "
                           f"missing")
    describe_dataset(reinforced, uri)


def train(params: str, storage_root: str, run_id: str, data: Any, nodes: int, gpus: int, image: str,
          placement: dict[str, Any], checkpoint: Any, metrics: Any) -> None:
    """Train: in this process, with torchrun over this node's GPUs when there are several, or, with `nodes` > 1,
    as a Kubeflow Trainer TrainJob that reads the shards from and writes the outputs to object storage."""
    cfg = load(params, run_id)
    uri = run_prefix(storage_root, run_id, "train")
    if nodes > 1:
        train_on_nodes(cfg, run_id, uri_of(data), uri, nodes, gpus, image, placement)
    elif gpus > 1:
        torchrun(cfg, gpus, uri_of(data), uri)
    else:
        stages.run_train(cfg=cfg, data=uri_of(data), out=uri)
    describe_files(checkpoint, uri, ["metrics.json", "train_log.csv"], final=storage.join(uri, "final.pt"))
    for key, value in storage.read_json(storage.join(uri, "metrics.json")).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, float(value))


def train_on_nodes(cfg: Config, run_id: str, data_uri: str, out_uri: str, nodes: int, gpus: int, image: str,
                   placement: dict[str, Any]) -> None:
    """Create the TrainJob (lightclip_core/launch) in this pod's namespace and wait for it; a failed node fails the
    task with the job's reason. Each node gets the training task's CPU and memory limits (`resources.train`) as its
    requests and limits."""
    import yaml

    from lightclip_core.launch.command import kubernetes_apis
    from lightclip_core.launch.trainjob import TrainJobLauncher, TrainJobSpec

    spec = TrainJobSpec(name=f"lightclip-{run_id}"[:40].rstrip("-").lower(), image=image, data=data_uri,
                        out=out_uri, nodes=nodes, gpus_per_node=gpus, namespace=pod_namespace(),
                        cpu=cfg.resources.train.cpu_limit, memory=cfg.resources.train.memory_limit, **placement)
    spec.check()
    launcher = TrainJobLauncher(*kubernetes_apis())
    submitted = launcher.submit(spec, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    launcher.wait(submitted.name, submitted.namespace)


def pod_namespace() -> str:
    """The namespace this task runs in (its service account's), `default` outside a cluster."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"


def torchrun(cfg: Config, nproc: int, data: str, out: str) -> None:
    """`torchrun --nproc-per-node N -m lightclip_core.cli train` on this node (rank 0 publishes `out`); a rank's
    failure fails the task."""
    from lightclip_core.pipeline.arguments import config_json

    params = workdir("torchrun") / "params.json"  # JSON is YAML: the CLI reads it as a params file
    params.write_text(config_json(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lightclip_core.cli", "train", "--params", str(params), "--data", data, "--out", out]
    done = subprocess.run(cmd)
    shutil.rmtree(params.parent, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun over {nproc} processes failed with exit code {done.returncode} (see the log "
                           f"above for the failed rank)")


def export(params: str, storage_root: str, run_id: str, checkpoint: Any, model: Any) -> None:
    """Fold and export the trained weights (safetensors, torch.export, ONNX), parity-checked."""
    cfg = load(params, run_id)
    uri = run_prefix(storage_root, run_id, "export")
    result = stages.run_export(cfg=cfg, checkpoint=checkpoint.metadata["final"], out=uri)
    describe_files(model, uri, ["config.json", "parity.json"], parity=result.parity)


def evaluate(params: str, storage_root: str, run_id: str, model: Any, test: Any, checkpoint: Any,
             metrics: Any, confusion: Any, report: Any) -> bool:
    """Zero-shot classification and retrieval; returns the evaluation gate (registry.min_gate_value)."""
    from lightclip_core.evaluate.evaluation import PER_CLASS_FILE
    from lightclip_core.register.registration import gate_passes

    cfg = load(params, run_id)
    uri = run_prefix(storage_root, run_id, "eval")
    result = stages.run_evaluate(cfg=cfg, model=uri_of(model), data=uri_of(test), out=uri,
                                 train_log=Path(checkpoint.path) / "train_log.csv")
    for key, value in result.metrics.items():
        metrics.log_metric(key.replace("@", "_at_"), float(value))
    per_class = storage.read_json(storage.join(uri, PER_CLASS_FILE))
    task = gate_task(cfg, per_class)
    confusion.log_confusion_matrix(per_class[task]["classes"], per_class[task]["confusion"])
    confusion.metadata["task"] = task
    storage.download_file(storage.join(uri, "report.md"), report.path)
    passed, reason = gate_passes(cfg, result.metrics)
    report.metadata.update({URI: uri, "gate": reason, "passed": passed})
    return passed


def gate_task(cfg: Config, per_class: dict[str, Any]) -> str:
    """The zero-shot task whose confusion matrix the UI shows: the one the gate metric names, else the first."""
    named = cfg.registry.gate_metric.split("/")
    return named[1] if len(named) > 1 and named[0] == "zeroshot" and named[1] in per_class else sorted(per_class)[0]


def register(params: str, run_id: str, model: Any, evaluation: Any, checkpoint: Any, train: Any, test: Any,
             decision: Any) -> None:
    """Register the evaluated export in MLflow and move `champion` if it beats the current one."""
    cfg = load(params, run_id)
    work = workdir("register")
    record = stages.run_register(cfg=cfg, model=uri_of(model), eval=uri_of(evaluation), train_data=Path(train.path),
                                 test_data=Path(test.path), train_log=Path(checkpoint.path) / "train_log.csv",
                                 out=work).summary()
    report = work / "report.md"
    shutil.copyfile(report, decision.path) if report.is_file() else Path(decision.path).write_text(
        f"# Registration\n\n```json\n{json.dumps(record, indent=2, default=str)}\n```\n")
    decision.metadata.update({k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))})
    shutil.rmtree(work, ignore_errors=True)
