"""The bodies of the Kubeflow components: each localises its inputs from object storage, runs the same stage command
as `lightclip <stage>` (same validation, same MLflow run), publishes its outputs back to storage and fills its typed
KFP artifacts.

Large data never travels as a KFP artifact: a Dataset artifact holds the split's `manifest.json` and, in its metadata,
the URI of the shards; a Model artifact holds the small descriptive files and the URI of the weights. Locations are
content-addressed for the pure stages (data, teacher, reinforcement: the fingerprint of the parameters they read), so
KFP's cache and a rerun find the same objects, and run-scoped (`runs/<KFP run id>/`) for training and after.

Artifacts are duck-typed here (`.path`, `.metadata`, `.log_metric`, `.log_confusion_matrix`): lightclip_core does not
import kfp at run time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightclip_core.config import Config, validate
from lightclip_core.data import storage
from lightclip_core.tracking.mlflow_utils import KFP_ENV as RUN_ENV, ORCHESTRATOR_ENV

URI = "uri"
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------------- helpers
def load(params: str, run_id: str | None = None) -> Config:
    """The run's configuration (validated again: a component may be started by hand). The MLflow runs of the
    run-scoped stages are grouped under the KFP run (`run_id`); the pure, cached stages get none, since their
    output is shared by every run with the same parameters."""
    os.environ[ORCHESTRATOR_ENV] = "kfp"
    if run_id:
        os.environ[RUN_ENV] = run_id
    return validate(json.loads(params))


def fingerprint(cfg: Config, *sections: str) -> str:
    """16 hex digits of the sha256 of the named config sections (dotted paths): where a pure stage's output lives."""
    dumped = cfg.model_dump(mode="json")
    picked = {}
    for section in sections:
        node: Any = dumped
        for part in section.split("."):
            node = node[part]
        picked[section] = node
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def workdir(name: str) -> Path:
    """A fresh local directory for one stage's work (`$LIGHTCLIP_WORKDIR`, else the temporary directory)."""
    root = Path(os.environ.get("LIGHTCLIP_WORKDIR") or tempfile.gettempdir()) / "lightclip-work"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


def localise(uri: str) -> Path:
    """A local directory holding the objects under `uri` (the directory itself for a local root)."""
    return storage.fetch_to_local(uri.rstrip("/") + "/" if storage.is_s3(uri) else uri, storage.default_cache_dir())


def run_command(name: str, cfg: Config, *args: str) -> dict[str, Any]:
    """Run `lightclip <name> <args>` in this process with an already validated config: the same input checks, stage
    function and MLflow run as the command line."""
    from lightclip_core.cli import COMMANDS, build_parser

    return COMMANDS[name][0](cfg, build_parser().parse_args([name, *args]))


def describe_dataset(artifact: Any, uri: str, local_dir: Path) -> None:
    """A Dataset artifact: the split's manifest (a copy) and where its shards are."""
    Path(artifact.path).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local_dir / MANIFEST, Path(artifact.path) / MANIFEST)
    manifest = json.loads((local_dir / MANIFEST).read_text())
    artifact.metadata.update({URI: uri, "num_samples": manifest.get("num_samples"),
                              "shards": len(manifest.get("shards", []))})


def describe_files(artifact: Any, uri: str, local_dir: Path, names: list[str], **metadata: Any) -> None:
    """A Model-like artifact: a few small files copied from `local_dir` and the URI of the whole directory."""
    Path(artifact.path).mkdir(parents=True, exist_ok=True)
    for name in names:
        if (local_dir / name).is_file():
            shutil.copyfile(local_dir / name, Path(artifact.path) / name)
    artifact.metadata.update({URI: uri, **metadata})


def uri_of(artifact: Any) -> str:
    return artifact.metadata[URI]


# ---------------------------------------------------------------------------------------------------- stages
def prepare(params: str, storage_root: str, train: Any, test: Any) -> None:
    """Generate or ingest the dataset into `<root>/data/<fingerprint>/{train,val,test}`."""
    cfg = load(params)
    base = storage.join(storage_root, "data", fingerprint(cfg, "data"))
    work = workdir("prepare")
    run_command("prepare", cfg, "--out", str(work))
    for split in ("train", "val", "test"):
        storage.publish_dir(work / split, storage.join(base, split))
    describe_dataset(train, storage.join(base, "train"), work / "train")
    describe_dataset(test, storage.join(base, "test"), work / "test")
    shutil.rmtree(work, ignore_errors=True)


def teacher(params: str, storage_root: str, train: Any, model: Any) -> None:
    """Train the embedded default's teachers (CoCa captioner + second CLIP) on the training split."""
    cfg = load(params)
    uri = storage.join(storage_root, "teacher", fingerprint(cfg, "data", "teacher.train", "teacher.second",
                                                            "model.image.mean", "model.image.std"))
    work = workdir("teacher")
    result = run_command("teacher", cfg, "--data", str(localise(uri_of(train))), "--out", str(work))
    storage.publish_dir(work, uri)
    describe_files(model, uri, work, ["metrics.json"], models=[Path(m).name for m in result["models"]])
    shutil.rmtree(work, ignore_errors=True)


def reinforced_uri(cfg: Config, storage_root: str) -> str:
    return storage.join(storage_root, "reinforced",
                        fingerprint(cfg, "data", "teacher", "reinforce", "model.image.mean", "model.image.std"),
                        "train")


def shard_groups(train: Any, groups: int) -> list[str]:
    """`groups` contiguous, near-equal shard ranges `A:B` of the training split (fewer when it has fewer shards)."""
    count = len(json.loads((Path(train.path) / MANIFEST).read_text())["shards"])
    groups = max(1, min(groups, count))
    bounds = [round(i * count / groups) for i in range(groups + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def reinforce_group(params: str, storage_root: str, train: Any, teacher_model: Any, shards: str) -> str:
    """One worker of the fan-out: `lightclip reinforce --shards A:B --no-publish` into the reinforced prefix. The
    manifest is published once, by :func:`publish_reinforced`, after every group."""
    cfg = load(params)
    run_command("reinforce", cfg, "--data", uri_of(train), "--teacher", str(localise(uri_of(teacher_model))),
                "--out", reinforced_uri(cfg, storage_root), "--shards", shards, "--no-publish")
    return shards


def publish_reinforced(params: str, storage_root: str, train: Any, teacher_model: Any, reinforced: Any) -> None:
    """The join after the fan-out: `lightclip publish-reinforced`, once (the entries name the teachers by the same
    local path every group used); a missing shard fails the task."""
    cfg = load(params)
    uri = reinforced_uri(cfg, storage_root)
    summary = run_command("publish-reinforced", cfg, "--data", uri_of(train),
                          "--teacher", str(localise(uri_of(teacher_model))), "--out", uri)
    if not summary["complete"]:
        raise RuntimeError(f"{uri}: reinforcement incomplete after every group: {summary['missing_shards']} shards "
                           f"missing")
    work = workdir("reinforced")
    storage.download_file(storage.join(uri, MANIFEST), work / MANIFEST)
    describe_dataset(reinforced, uri, work)
    shutil.rmtree(work, ignore_errors=True)


def run_prefix(storage_root: str, run_id: str, stage: str) -> str:
    return storage.join(storage_root, "runs", run_id or "manual", stage)


def train(params: str, storage_root: str, run_id: str, data: Any, nodes: int, gpus: int, image: str,
          placement: dict[str, Any], checkpoint: Any, metrics: Any) -> None:
    """Train: in this process, with torchrun over this node's GPUs when there are several, or, with `nodes` > 1,
    as a Kubeflow Trainer TrainJob that reads the shards from and writes the outputs to object storage."""
    cfg = load(params, run_id)
    work = workdir("train")
    uri = run_prefix(storage_root, run_id, "train")
    if nodes > 1:
        train_on_nodes(cfg, run_id, uri_of(data), uri, nodes, gpus, image, placement)
        for name in ("metrics.json", "train_log.csv"):
            storage.download_file(storage.join(uri, name), work / name)
    else:
        data_dir = localise(uri_of(data))
        if gpus > 1:
            torchrun(cfg, gpus, data_dir, work)
        else:
            run_command("train", cfg, "--data", str(data_dir), "--out", str(work))
        storage.publish_dir(work, uri, last=("final.pt",))
    describe_files(checkpoint, uri, work, ["metrics.json", "train_log.csv"], final=storage.join(uri, "final.pt"))
    for key, value in json.loads((work / "metrics.json").read_text()).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, float(value))
    shutil.rmtree(work, ignore_errors=True)


def train_on_nodes(cfg: Config, run_id: str, data_uri: str, out_uri: str, nodes: int, gpus: int, image: str,
                   placement: dict[str, Any]) -> None:
    """Create the TrainJob (lightclip_core/launch) in this pod's namespace and wait for it; a failed node fails the
    task with the job's reason."""
    import yaml

    from lightclip_core.launch.command import kubernetes_apis
    from lightclip_core.launch.trainjob import TrainJobLauncher, TrainJobSpec

    spec = TrainJobSpec(name=f"lightclip-{run_id}"[:40].rstrip("-").lower(), image=image, data=data_uri,
                        out=out_uri, nodes=nodes, gpus_per_node=gpus, namespace=pod_namespace(), **placement)
    spec.check()
    launcher = TrainJobLauncher(*kubernetes_apis())
    submitted = launcher.submit(spec, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    launcher.wait(submitted.name, submitted.namespace)


def pod_namespace() -> str:
    """The namespace this task runs in (its service account's), `default` outside a cluster."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"


def torchrun(cfg: Config, nproc: int, data_dir: Path, out_dir: Path) -> None:
    """`torchrun --nproc-per-node N -m lightclip_core.cli train` on this node; a rank's failure fails the task."""
    from lightclip_core.pipeline.arguments import config_json

    params = out_dir.parent / f"{out_dir.name}-params.json"  # JSON is YAML: the CLI reads it as a params file
    params.write_text(config_json(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lightclip_core.cli", "train", "--params", str(params), "--data", str(data_dir),
           "--out", str(out_dir)]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun over {nproc} processes failed with exit code {done.returncode} (see the log "
                           f"above for the failed rank)")


def export(params: str, storage_root: str, run_id: str, checkpoint: Any, model: Any) -> None:
    """Fold and export the trained weights (safetensors, torch.export, ONNX), parity-checked."""
    cfg = load(params, run_id)
    work = workdir("export")
    final = work / "final.pt"
    storage.download_file(checkpoint.metadata["final"], final)
    result = run_command("export", cfg, "--checkpoint", str(final), "--out", str(work / "export"))
    uri = run_prefix(storage_root, run_id, "export")
    storage.publish_dir(work / "export", uri, last=("config.json",))
    describe_files(model, uri, work / "export", ["config.json", "parity.json"], parity=result["parity"])
    shutil.rmtree(work, ignore_errors=True)


def evaluate(params: str, storage_root: str, run_id: str, model: Any, test: Any, checkpoint: Any,
             metrics: Any, confusion: Any, report: Any) -> bool:
    """Zero-shot classification and retrieval; returns the evaluation gate (registry.min_gate_value)."""
    from lightclip_core.evaluate.stage import PER_CLASS_FILE
    from lightclip_core.tracking.registry import gate_passes

    cfg = load(params, run_id)
    work = workdir("evaluate")
    train_log = Path(checkpoint.path) / "train_log.csv"
    values = run_command("evaluate", cfg, "--model", str(localise(uri_of(model))), "--data",
                         str(localise(uri_of(test))), "--train-log", str(train_log), "--out", str(work))
    uri = run_prefix(storage_root, run_id, "eval")
    storage.publish_dir(work, uri, last=("metrics.json",))
    for key, value in values.items():
        metrics.log_metric(key.replace("@", "_at_"), float(value))
    per_class = json.loads((work / PER_CLASS_FILE).read_text())
    task = gate_task(cfg, per_class)
    confusion.log_confusion_matrix(per_class[task]["classes"], per_class[task]["confusion"])
    confusion.metadata["task"] = task
    shutil.copyfile(work / "report.md", report.path)
    passed, reason = gate_passes(cfg, values)
    report.metadata.update({URI: uri, "gate": reason, "passed": passed})
    shutil.rmtree(work, ignore_errors=True)
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
    record = run_command("register", cfg, "--model", str(localise(uri_of(model))),
                         "--eval", str(localise(uri_of(evaluation))),
                         "--train-data", str(Path(train.path)), "--test-data", str(Path(test.path)),
                         "--train-log", str(Path(checkpoint.path) / "train_log.csv"), "--out", str(work))
    report = work / "report.md"
    shutil.copyfile(report, decision.path) if report.is_file() else Path(decision.path).write_text(
        f"# Registration\n\n```json\n{json.dumps(record, indent=2, default=str)}\n```\n")
    decision.metadata.update({k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))})
    shutil.rmtree(work, ignore_errors=True)
