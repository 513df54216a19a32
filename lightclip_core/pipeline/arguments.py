"""The Kubeflow pipeline's parameters: the whole `params.yaml` (validated by the same schema as every stage) plus the
orchestration settings that only the cluster has (storage, fan-out, GPUs, placement).

`--param key=value` on the command line is either an orchestration setting (a name of ORCHESTRATION) or, with a
dot, a `params.yaml` override (`train.lr=5e-4`), exactly like `lightclip --set`. Everything is checked here, before
anything is compiled or submitted: a bad value is one line naming the field (ConfigError).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from lightclip_core.config import Config, ConfigError, load_config


@dataclass(frozen=True)
class Setting:
    default: Any
    kind: type
    help: str
    minimum: int | None = None


ORCHESTRATION: dict[str, Setting] = {
    "storage_root": Setting("s3://lightclip/pipeline", str, "where shards, teachers, checkpoints and exports live "
                                                           "(s3://bucket/prefix, or a local directory for kfp.local)"),
    "reinforce_groups": Setting(4, int, "shard groups reinforced in parallel (the ParallelFor fan-out)", 1),
    "train_nodes": Setting(1, int, "training nodes; more than one goes through a Kubeflow Trainer TrainJob", 1),
    "train_gpus": Setting(1, int, "GPUs per training node (torchrun runs one process per GPU); 0 trains on CPU", 0),
    "gpu_resource": Setting("nvidia.com/gpu", str, "the GPU resource name asked for"),
    "node_selector": Setting({}, dict, "node selector of the training task, e.g. {\"nvidia.com/gpu.product\": \"H100\"}"),
    "tolerations": Setting([], list, "tolerations of the training task (Kubernetes toleration objects)"),
}


def check_orchestration(values: dict[str, Any]) -> dict[str, Any]:
    """Every orchestration setting, defaults filled in, each of the right type and range."""
    unknown = sorted(set(values) - set(ORCHESTRATION))
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a pipeline parameter (known: {', '.join(ORCHESTRATION)}; "
                          f"params.yaml fields are written section.field)")
    out = {name: setting.default for name, setting in ORCHESTRATION.items()}
    for name, value in values.items():
        setting = ORCHESTRATION[name]
        if setting.kind is int and isinstance(value, bool) or not isinstance(value, setting.kind):
            raise ConfigError(f"{name}={value!r}: expected {setting.kind.__name__}")
        if setting.minimum is not None and value < setting.minimum:
            raise ConfigError(f"{name}={value!r}: must be at least {setting.minimum}")
        if setting.kind is str and not value:
            raise ConfigError(f"{name}: must not be empty")
        out[name] = value
    if out["tolerations"] and not all(isinstance(t, dict) for t in out["tolerations"]):
        raise ConfigError("tolerations: expected a list of toleration objects ({key, operator, value, effect})")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in out["node_selector"].items()):
        raise ConfigError("node_selector: expected a mapping of label to value (strings)")
    return out


def split_pairs(pairs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`key=value` strings -> (orchestration settings, params.yaml overrides). Values are YAML scalars or flow
    collections (`tolerations=[{key: gpu, operator: Exists}]`)."""
    settings: dict[str, Any] = {}
    overrides: list[str] = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected key=value")
        if "." in key:
            overrides.append(pair)
            continue
        try:
            settings[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{key}={text!r}: not a valid value") from None
    return settings, overrides


def config_json(cfg: Config) -> str:
    """The validated configuration as the pipeline's `params` argument (the stages validate it again)."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def pipeline_arguments(params_path: str | None, pairs: list[str]) -> dict[str, Any]:
    """The arguments of one pipeline run: `params` (params.yaml + overrides, validated) and every orchestration
    setting."""
    settings, overrides = split_pairs(pairs)
    cfg = load_config(params_path, overrides)
    return {"params": config_json(cfg), **check_orchestration(settings)}
