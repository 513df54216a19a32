"""`model.init_from`: the weights a training run starts from, found and checked before its MLflow run opens.

A value is a training checkpoint of this project (a `.pt` file, or a train output directory: its `final.pt`), an
export directory (`config.json` + `model.safetensors`; usable only when folding left the training-time weights as
they were), an `s3://` URI of either, or a registered model `models:/<name>@<alias>` | `models:/<name>/<version>`
(a version's pyfunc artifacts hold its export directory, see lightclip_core/register/registration.py). The result is
the state dict the trainer loads strictly at step 0 (lightclip_core/train/start.py). A value naming none of these, or
weights of another architecture, is an InputError: one line naming `model.init_from`, the value and what is allowed.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError

from lightclip_core.config import Config, ModelConfig, flatten
from lightclip_core.export.format import CONFIG_FILE, EXPORT_ARTIFACT, WEIGHTS_FILE
from lightclip_core.infra import storage
from lightclip_core.models.config import registered_model
from lightclip_core.stages.io import InputError, localise
from lightclip_core.tracking.spool import first_line

FINAL = "final.pt"
EXPORT_PATH = ".export_path"  # in a downloaded registered version: where its export directory lies
ALLOWED = ("allowed: a training checkpoint (.pt, or a train output directory with final.pt), an export directory "
           "(config.json + model.safetensors), an s3:// URI of either, or models:/<name>@<alias> | "
           "models:/<name>/<version>")
SAME_MODEL = "allowed: weights of the model that params.yaml's `model` section describes"


def bad_start(value: str, why: str, allowed: str = ALLOWED) -> InputError:
    return InputError(f"model.init_from={value!r}: {why}; {allowed}")


def start_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    """The state dict `model.init_from` (or the open_clip student's pretrained weights) names, checked against
    `cfg.model`; None for a random start."""
    value = cfg.model.init_from
    if value is None:
        return open_clip_weights(cfg) if cfg.model.start_source() is not None else None
    found = registered_export(cfg, value) if registered_model(value) else localised_start(value)
    if found.is_file():
        return checkpoint_weights(cfg, value, found)
    if (found / FINAL).is_file():
        return checkpoint_weights(cfg, value, found / FINAL)
    if (found / CONFIG_FILE).is_file() and (found / WEIGHTS_FILE).is_file():
        return export_weights(cfg, value, found)
    raise bad_start(value, f"neither a training checkpoint nor an export directory (no {FINAL}, no {CONFIG_FILE} + "
                           f"{WEIGHTS_FILE})")


def open_clip_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The open_clip student's pretrained weights (a tag, a checkpoint file or `s3://` URI, a local-dir's own file),
    loaded by open_clip's own loader into the student, as its state dict."""
    from lightclip_core.models import build_model
    from lightclip_core.models.open_clip_student import load_open_clip_weights, pretrained_file

    spec = cfg.model.open_clip
    field = "model.open_clip." + ("pretrained" if spec.pretrained is not None else "model")
    value = spec.pretrained if spec.pretrained is not None else spec.model
    try:
        pretrained = spec.pretrained
        if pretrained is not None and storage.is_s3(pretrained):
            pretrained = str(storage.fetch_to_local(pretrained, storage.default_cache_dir()))
        weights = pretrained_file(spec.model, pretrained)
        student = build_model(cfg.model)
        load_open_clip_weights(student, weights)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError, pickle.UnpicklingError) as err:
        # what open_clip's loaders raise for a file that is not weights of this architecture
        raise InputError(f"{field}={value!r}: cannot load it into {spec.model} ({first_line(err)}); allowed: a "
                         f"pretrained tag of the model, a checkpoint file or s3:// URI of its architecture, or a "
                         f"local-dir holding its weights") from None
    return student.state_dict()


def localised_start(value: str) -> Path:
    """A local path or `s3://` URI as a local file or directory: of a train output only its final.pt is fetched."""
    if not storage.is_s3(value):
        if not Path(value).exists():
            raise bad_start(value, "does not exist")
        return Path(value)
    cache = storage.default_cache_dir()
    if storage.stat(value) is not None:  # an object: a checkpoint
        return storage.fetch_to_local(value, cache)
    if storage.exists(storage.join(value, FINAL)):
        return storage.fetch_to_local(storage.join(value, FINAL), cache)
    if storage.exists(storage.join(value, CONFIG_FILE)):
        return localise(value)
    raise bad_start(value, "neither a training checkpoint nor an export directory" if storage.exists(value) else
                    "does not exist")


def read_checkpoint(path: Path, where: str, allowed: str) -> dict[str, Any]:
    """A training checkpoint's content; a file that is not one is an InputError naming `where`."""
    from lightclip_core.train.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - torch.load of a foreign file raises KeyError, UnpicklingError, ...
        raise InputError(f"{where}: not a readable training checkpoint ({first_line(err)}); {allowed}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config"} <= set(ckpt):
        raise InputError(f"{where}: not a training checkpoint (it has no model and model_config); {allowed}")
    return ckpt


def check_architecture(cfg: Config, value: str, recorded: Any) -> None:
    """The start weights' recorded model configuration must be `cfg.model`'s, but for the preset's name (its values
    are the fields) and `init_from`; the first differing field is named."""
    try:
        theirs = flatten(ModelConfig.model_validate(recorded).architecture())
    except ValidationError as err:
        problem = err.errors()[0]
        raise bad_start(value, f"its model_config.{'.'.join(map(str, problem['loc']))}: {problem['msg']}",
                        SAME_MODEL) from None
    ours = flatten(cfg.model.architecture())
    differs = next((k for k in ours if k != "preset" and theirs.get(k) != ours[k]), None)
    if differs is not None:
        raise bad_start(value, f"its weights are of another model (model.{differs}={theirs.get(differs)!r} there, "
                               f"{ours[differs]!r} in params)", SAME_MODEL)


def checkpoint_weights(cfg: Config, value: str, path: Path) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(path, f"model.init_from={value!r}", ALLOWED)
    check_architecture(cfg, value, ckpt["model_config"])
    return ckpt["model"]


def export_weights(cfg: Config, value: str, path: Path) -> dict[str, torch.Tensor]:
    """The export's weights as the training-time model's: only when folding and pruning left them as they were."""
    from lightclip_core.export.load import FoldedExportError, read_export_config, training_state_dict

    try:
        config = read_export_config(path)
        recorded = config["model_config"]
    except (ValueError, KeyError, OSError) as err:
        raise bad_start(value, f"not an export this version reads ({first_line(err)})") from None
    check_architecture(cfg, value, recorded)
    try:
        return training_state_dict(path, config)
    except FoldedExportError as err:
        raise bad_start(value, f"the export's {err}", "start from its run's training checkpoint (final.pt) instead"
                        ) from None


def registered_export(cfg: Config, value: str) -> Path:
    """The export directory of the registered model version `value` names, downloaded once into the cache (a version's
    artifacts never change): its MLmodel says where the pyfunc model keeps the export."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from lightclip_core.tracking.mlflow_utils import check_reachable, tracking_uri

    name, alias, version = registered_model(value)
    uri = tracking_uri(cfg.tracking)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        raise bad_start(value, f"no such registered model version in {storage.redact_uri(uri)} "
                               f"({first_line(err)})") from None
    source = f"models:/{name}/{found.version}"
    model_key = hashlib.sha256(f"{uri}\n{name}".encode()).hexdigest()[:16]  # a registry's model, safe as a path
    target = storage.default_cache_dir() / "registry" / model_key / str(found.version)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{found.version}-", dir=target.parent))
        try:
            mlmodel = mlflow.artifacts.download_artifacts(f"{source}/MLmodel", dst_path=str(work / "meta"),
                                                          tracking_uri=uri, registry_uri=uri)
            artifacts = Model.load(mlmodel).flavors.get("python_function", {}).get("artifacts") or {}
            if EXPORT_ARTIFACT not in artifacts:
                raise bad_start(value, f"version {found.version} is not a LightCLIP model (its pyfunc artifacts have "
                                       f"no {EXPORT_ARTIFACT!r})")
            inner = artifacts[EXPORT_ARTIFACT]["path"]  # the export directory's own name, under artifacts/
            mlflow.artifacts.download_artifacts(f"{source}/{inner}", dst_path=str(work / "model"), tracking_uri=uri,
                                                registry_uri=uri)
            (work / "model" / EXPORT_PATH).write_text(inner)
            with contextlib.suppress(OSError):  # another process may have put the same version there first
                os.replace(work / "model", target)
        except MlflowException as err:
            raise bad_start(value, f"version {found.version}'s artifacts cannot be downloaded ({first_line(err)})"
                            ) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target / (target / EXPORT_PATH).read_text()
