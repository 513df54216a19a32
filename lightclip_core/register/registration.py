"""Registration and gated promotion of evaluated models in the MLflow model registry.

Every evaluated model becomes a new version of `registry.model_name` (a pyfunc model logged from code, see
:mod:`lightclip_core.export.pyfunc_model`) and gets the alias `candidate`. The alias `champion` moves to it only
when it beats the current champion on `registry.gate_metric` by more than `registry.margin`, or when there is no
champion. The decision and both figures are version tags (`gate.*`), every evaluation metric is a version tag
(`metric.*`, which is what a later candidate is compared with), and the version's description is a model card.

Moving `champion` is the last write: a failure anywhere before it leaves the current champion untouched, and the
half-registered version is tagged `gate.decision=failed`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.shards import describe_dataset
from lightclip_core.evaluate.report import (Comparison, GateFigures, ReportInputs, model_card, wise_ft_curves,
                                            write_report)
from lightclip_core.export.format import EXPORT_ARTIFACT
from lightclip_core.infra.storage import write_json_atomic
from lightclip_core.tracking.mlflow_utils import StageRun, git_state, manifest_digest, metric_key

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
DECISION_FILE = "decision.json"
MODEL_NAME_IN_RUN = "model"
PROMOTED, NOT_PROMOTED, SKIPPED, FAILED = "promoted", "not promoted", "skipped", "failed"
# What the pyfunc model imports at load time; pinned to the versions it was registered with.
_RUNTIME_DISTRIBUTIONS = ("mlflow", "torch", "torchvision", "timm", "open_clip_torch", "onnxruntime", "safetensors",
                          "numpy", "pandas", "pillow", "pydantic", "pyyaml")


@dataclass
class Decision:
    promote: bool
    reason: str


@dataclass
class RegisterInputs:
    """The files a registration reads; `metrics` is the evaluation's metrics.json."""

    export_dir: Path
    eval_dir: Path
    metrics: dict[str, float]
    train_data: Path | None = None
    test_data: Path | None = None
    train_log: Path | None = None


@dataclass
class RegisterResult(GateFigures):
    """The decision record (`decision.json`): promoted, not promoted or skipped, and why."""

    decision: str
    reason: str
    version: str | None = None
    champion_before: str | None = None
    champion_value: float | None = None
    champion_after: str | None = None
    model_uri: str | None = None
    run_id: str | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the gate
def gate_passes(cfg: Config, metrics: dict[str, float]) -> tuple[bool, str]:
    """The evaluation gate (registry.min_gate_value): whether the model is to be registered at all, and why."""
    reg = cfg.registry
    if reg.gate_metric not in metrics:
        raise ConfigError(f"registry.gate_metric={reg.gate_metric!r} is not among the evaluation metrics; available: "
                          f"{sorted(k for k in metrics if k != 'num_test_samples')}")
    value = float(metrics[reg.gate_metric])
    if reg.min_gate_value is None:
        return True, f"no evaluation gate (registry.min_gate_value is null); {reg.gate_metric}={value:.4f}"
    if value >= reg.min_gate_value:
        return True, f"{reg.gate_metric}={value:.4f} >= registry.min_gate_value={reg.min_gate_value}"
    return False, f"{reg.gate_metric}={value:.4f} < registry.min_gate_value={reg.min_gate_value}: not registered"


def decide(candidate: float, champion: float | None, margin: float, champion_exists: bool | None = None) -> Decision:
    """Promote iff there is no champion, or `candidate > champion + margin` (higher is better)."""
    exists = champion is not None if champion_exists is None else champion_exists
    if not exists:
        return Decision(True, "there is no champion yet")
    if not math.isfinite(candidate):
        return Decision(False, f"the candidate's figure {candidate} is not a number")
    if champion is None:
        return Decision(False, "the champion has no recorded figure for the gate metric, so the two cannot be "
                               "compared; move the alias by hand if the candidate should win")
    if candidate > champion + margin:
        return Decision(True, f"{candidate:.4f} beats {champion:.4f} by {candidate - champion:.4f}, "
                              f"more than the margin {margin:g}")
    return Decision(False, f"{candidate:.4f} does not beat {champion:.4f} by more than the margin {margin:g}")


# ------------------------------------------------------------------------------------------------- inputs
def read_inputs(cfg: Config, export_dir: str | os.PathLike, eval_dir: str | os.PathLike,
                train_data: str | os.PathLike | None = None, test_data: str | os.PathLike | None = None,
                train_log: str | os.PathLike | None = None) -> RegisterInputs:
    """Check everything a registration needs before any work; a problem raises :class:`ConfigError`."""
    export_dir, eval_dir = Path(export_dir), Path(eval_dir)
    if not (export_dir / "config.json").is_file():
        raise ConfigError(f"{str(export_dir)!r} is not an export directory (no config.json); run `lightclip export`")
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{str(metrics_path)!r} does not exist; run `lightclip evaluate` first")
    metrics = json.loads(metrics_path.read_text())
    gate = cfg.registry.gate_metric
    if gate not in metrics:
        raise ConfigError(f"registry.gate_metric={gate!r} is not in {str(metrics_path)!r}; available: "
                          f"{sorted(k for k in metrics if k != 'num_test_samples')}")
    optional = {name: Path(p) if p is not None and Path(p).exists() else None
                for name, p in (("train_data", train_data), ("test_data", test_data), ("train_log", train_log))}
    check_servable(export_dir)
    return RegisterInputs(export_dir, eval_dir, {k: float(v) for k, v in metrics.items()}, **optional)


def check_servable(export_dir: Path) -> None:
    """Run the pyfunc's inference on its own input example, so that a broken export is never registered."""
    from lightclip_core.export.inference import Embedder, predict_frame

    try:
        out = predict_frame(Embedder(export_dir), input_example(export_dir), {"classnames": ["circle", "square"]})
    except Exception as err:  # noqa: BLE001 - any failure means the model cannot serve: say so in one line
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(f"{str(export_dir)!r} cannot serve predictions ({type(err).__name__}: {first_line})") \
            from None
    if out.at[0, "label"] is None or out.at[0, "image_embedding"] is None or out.at[0, "text_embedding"] is None:
        raise ConfigError(f"{str(export_dir)!r}: the model returned no embedding for its input example")


def _manifest(path: Path | None) -> dict[str, Any] | None:
    return json.loads((path / "manifest.json").read_text()) if path and (path / "manifest.json").is_file() else None


# ------------------------------------------------------------------------------------------- the pyfunc
def pip_requirements() -> list[str]:
    """The model's runtime requirements, pinned to the installed versions (without local labels like +cpu)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _RUNTIME_DISTRIBUTIONS]


def model_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.binary, "image", required=False),
                     ColSpec(DataType.string, "text", required=False)])
    outputs = Schema([ColSpec(Array(DataType.double), "image_embedding", required=False),
                      ColSpec(Array(DataType.double), "text_embedding", required=False),
                      ColSpec(DataType.string, "label", required=False),
                      ColSpec(DataType.double, "score", required=False)])
    params = ParamSchema([ParamSpec("classnames", DataType.string, [], (-1,)),
                          ParamSpec("templates", DataType.string, [], (-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(export_dir: Path) -> Any:
    """One row: a PNG of a red disc at the model's input size, and a caption."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    size = int(json.loads((export_dir / "config.json").read_text())["preprocess"]["size"])
    yy, xx = np.mgrid[:size, :size]
    pixels = np.full((size, size, 3), 235, np.uint8)
    pixels[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (220, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    return pd.DataFrame({"image": [buffer.getvalue()], "text": ["a photo of a red circle."]})


def log_pyfunc(cfg: Config, export_dir: Path, run: StageRun) -> Any:
    """Log the export as a models-from-code pyfunc in the stage's run; returns MLflow's ModelInfo.

    The package travels with the model (`code_paths`), so loading needs only the pinned pip requirements: this
    environment, or `mlflow models serve` / a container built from the model's requirements elsewhere.
    """
    import mlflow

    import lightclip_core

    mlflow.set_tracking_uri(run.uri)
    with mlflow.start_run(run_id=run.run_id):  # resumes the stage run, so the model links to it
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(Path(lightclip_core.__file__).parent / "export" / "pyfunc_model.py"),
            artifacts={EXPORT_ARTIFACT: str(export_dir)},
            code_paths=[str(Path(lightclip_core.__file__).parent)],
            pip_requirements=pip_requirements(),
            signature=model_signature(),
            input_example=input_example(export_dir),
            model_config={"templates": list(cfg.evaluate.templates), "batch_size": cfg.evaluate.batch_size},
            metadata={"lightclip_export_format": json.loads((export_dir / "config.json").read_text())
                      .get("format_version")},
        )


# ---------------------------------------------------------------------------------------------- registry
def current_champion(client: Any, name: str) -> tuple[Any | None, dict[str, str]]:
    """The champion version of `name` (None if there is none) and its tags."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, {}
        raise
    version = (model.aliases or {}).get(CHAMPION)
    if version is None:
        return None, {}
    mv = client.get_model_version(name, str(version))
    return mv, dict(mv.tags or {})


def recorded_metrics(tags: dict[str, str], keys: list[str]) -> dict[str, float]:
    """The evaluation metrics recorded as `metric.*` tags of a version, under their metrics.json names."""
    out = {}
    for key in keys:
        value = tags.get(f"metric.{metric_key(key)}")
        if value is not None:
            out[key] = float(value)
    return out


def version_tags(inputs: RegisterInputs, comparison: Comparison, lineage: dict[str, str]) -> dict[str, str]:
    tags = {f"metric.{metric_key(k)}": repr(float(v)) for k, v in inputs.metrics.items()}
    tags.update({
        "gate.metric": comparison.gate_metric, "gate.margin": repr(comparison.margin),
        "gate.candidate_value": repr(comparison.candidate_value),
        "gate.champion_value": "none" if comparison.champion_value is None else repr(comparison.champion_value),
        "gate.champion_version": comparison.champion_version or "none",
        "gate.reason": comparison.reason,
    })
    tags.update({f"lineage.{k}": v for k, v in lineage.items()})
    return tags


def set_gate_tags(client: Any, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def lineage_of(run: StageRun, inputs: RegisterInputs) -> dict[str, str]:
    lineage = {"run_id": run.run_id or "", **git_state(run.root)}
    if run.parent_run_id:
        lineage["pipeline_run_id"] = run.parent_run_id
    for label, path in (("train_data", inputs.train_data), ("test_data", inputs.test_data)):
        if path is not None and (path / "manifest.json").is_file():
            lineage[f"{label}.manifest_sha256"] = manifest_digest(path)
    return lineage


def _copy_plots(eval_dir: Path, out_dir: Path, tasks: list[str]) -> dict[str, str]:
    from lightclip_core.evaluate.evaluation import plot_files

    found = {}
    for name, rel in plot_files(tasks).items():
        if (eval_dir / rel).is_file():
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(eval_dir / rel, out_dir / rel)
            found[name] = rel
    return found


def _report_inputs(inputs: RegisterInputs, out_dir: Path, comparison: Comparison, lineage: dict[str, str]
                   ) -> ReportInputs:
    from lightclip_core.evaluate.evaluation import training_summary

    per_class_path = inputs.eval_dir / "per_class.json"
    per_class = json.loads(per_class_path.read_text()) if per_class_path.is_file() else {}
    benchmarks_path = inputs.eval_dir / "benchmarks.json"  # evaluations of older versions have none
    benchmarks = json.loads(benchmarks_path.read_text()) if benchmarks_path.is_file() else {}
    test_manifest = _manifest(inputs.test_data)
    return ReportInputs(
        metrics=inputs.metrics, per_class=per_class,
        export_config=json.loads((inputs.export_dir / "config.json").read_text()),
        test_data=describe_dataset(test_manifest) if test_manifest else {},
        plots=_copy_plots(inputs.eval_dir, out_dir, sorted(per_class)),
        training=training_summary(inputs.train_log) if inputs.train_log else {},
        comparison=comparison, lineage=lineage, benchmarks=benchmarks, wise_ft=wise_ft_curves(inputs.metrics))


def register(cfg: Config, inputs: RegisterInputs, out_dir: str | os.PathLike, run: StageRun) -> RegisterResult:
    """Register the evaluated export as a new version, tag it, and move `champion` if it passes the gate.

    Writes `decision.json`, `report.md` and `report.html` (with the comparison against the champion) to `out_dir`
    and logs them to the run.
    """
    import mlflow
    from mlflow import MlflowClient

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reg = cfg.registry
    client = MlflowClient(run.uri)
    candidate_value = inputs.metrics[reg.gate_metric]
    champion, champion_tags = current_champion(client, reg.model_name)
    champion_value = recorded_metrics(champion_tags, [reg.gate_metric]).get(reg.gate_metric)
    decision = decide(candidate_value, champion_value, reg.margin, champion_exists=champion is not None)
    run.log_metrics(inputs.metrics)

    info = log_pyfunc(cfg, inputs.export_dir, run)
    version = str(mlflow.register_model(info.model_uri, reg.model_name).version)
    log.info("registered %s version %s from %s", reg.model_name, version, info.model_uri)
    try:
        lineage = lineage_of(run, inputs)
        comparison = Comparison(
            model_name=reg.model_name, candidate_version=version, gate_metric=reg.gate_metric, margin=reg.margin,
            candidate_value=candidate_value, promoted=decision.promote,
            reason=decision.reason + _test_set_note(champion_tags, lineage),
            champion_version=str(champion.version) if champion else None, champion_value=champion_value,
            champion_metrics=recorded_metrics(champion_tags, list(inputs.metrics)))
        report_inputs = _report_inputs(inputs, out_dir, comparison, lineage)
        write_report(report_inputs, out_dir, f"LightCLIP model {reg.model_name} version {version}")
        client.update_model_version(reg.model_name, version, description=model_card(report_inputs))
        set_gate_tags(client, reg.model_name, version, version_tags(inputs, comparison, lineage))
        client.set_registered_model_alias(reg.model_name, CANDIDATE, version)
        if decision.promote:
            comparison = _recheck(client, comparison)
        client.set_model_version_tag(reg.model_name, version, "gate.decision",
                                     PROMOTED if comparison.promoted else NOT_PROMOTED)
        if comparison.promoted:
            client.set_registered_model_alias(reg.model_name, CHAMPION, version)  # the last write
    except BaseException:
        _mark_failed(client, reg.model_name, version)
        raise
    result = RegisterResult(
        decision=PROMOTED if comparison.promoted else NOT_PROMOTED, reason=comparison.reason,
        model_name=reg.model_name, gate_metric=reg.gate_metric, margin=reg.margin, candidate_value=candidate_value,
        version=version, champion_before=comparison.champion_version, champion_value=comparison.champion_value,
        champion_after=version if comparison.promoted else comparison.champion_version, model_uri=info.model_uri,
        run_id=run.run_id)
    write_json_atomic(out_dir / DECISION_FILE, result.summary())
    run.set_tags({"gate.decision": result.decision, "registry.version": version})
    run.log_artifact(out_dir, "register")
    log.info("%s version %s: %s (%s)", reg.model_name, version, result.decision, result.reason)
    return result


def _test_set_note(champion_tags: dict[str, str], lineage: dict[str, str]) -> str:
    """The figures compare fairly only on the same test set: say so when the manifests differ."""
    key = "test_data.manifest_sha256"
    theirs, ours = champion_tags.get(f"lineage.{key}"), lineage.get(key)
    if theirs and ours and theirs != ours:
        return " (note: the champion was evaluated on a different test set)"
    return ""


def _recheck(client: Any, c: Comparison) -> Comparison:
    """Another pipeline may have promoted a model since we looked: decide again against the champion of now, and
    record that comparison instead."""
    now, tags = current_champion(client, c.model_name)
    if (str(now.version) if now else None) == c.champion_version:
        return c
    value = recorded_metrics(tags, [c.gate_metric]).get(c.gate_metric)
    log.warning("champion of %s moved to version %s during this registration; deciding again", c.model_name,
                now.version if now else None)
    decision = decide(c.candidate_value, value, c.margin, champion_exists=now is not None)
    c = replace(c, promoted=decision.promote, reason=decision.reason, champion_value=value,
                champion_version=str(now.version) if now else None)
    set_gate_tags(client, c.model_name, c.candidate_version, {
        "gate.champion_value": "none" if value is None else repr(value),
        "gate.champion_version": c.champion_version or "none", "gate.reason": c.reason})
    return c


def _mark_failed(client: Any, name: str, version: str) -> None:
    try:
        client.set_model_version_tag(name, version, "gate.decision", FAILED)
    except Exception:  # noqa: BLE001 - the original error matters more
        log.exception("could not tag %s version %s as failed", name, version)


def skipped(cfg: Config, inputs: RegisterInputs, out_dir: str | os.PathLike, why: str) -> RegisterResult:
    """No registration (registry or tracking disabled): write a decision saying so."""
    result = RegisterResult(decision=SKIPPED, reason=why, model_name=cfg.registry.model_name,
                            gate_metric=cfg.registry.gate_metric, margin=cfg.registry.margin,
                            candidate_value=inputs.metrics[cfg.registry.gate_metric])
    write_json_atomic(Path(out_dir) / DECISION_FILE, result.summary())
    return result
