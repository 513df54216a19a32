"""Which parameters each stage reads: the one list from which DVC's `params:` (checked by a test against
dvc.yaml) and the Kubeflow cache locations (:func:`fingerprint`) both follow.

A stage's output depends on what it reads and on what its upstream stages read, so a pure (cached, content-addressed)
stage's location in object storage is the fingerprint of the parameters of the stage and of every stage above it.
DVC needs only a stage's own reads: its `deps:` carry the upstream outputs.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from lightclip_core.config import Config

READS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    # data.max_skip_fraction: every stage that reads samples skips bad ones and fails past that fraction
    "teacher": ("teacher.train", "teacher.second", "model.image.mean", "model.image.std", "data.max_skip_fraction",
                # the quality measured on the validation split: prompts, and the captions sampled as reinforce will
                "evaluate.templates", "reinforce.num_captions", "reinforce.top_p", "reinforce.temperature",
                "reinforce.max_caption_tokens", "reinforce.seed"),
    "reinforce": ("reinforce", "teacher.ensemble", "teacher.captioner", "teacher.second", "teacher.gate",
                  "data.max_skip_fraction"),
    "train": ("model", "train", "objectives", "data.max_skip_fraction"),
    "export": ("export", "model"),
    # evaluate: the report describes the training from the model's lineage, not from params
    "evaluate": ("evaluate", "data.max_skip_fraction"),
    "register": ("registry", "evaluate.templates", "evaluate.batch_size"),  # the pyfunc model's defaults
}
UPSTREAM: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "teacher": ("prepare",),
    "reinforce": ("prepare", "teacher"),
    "train": ("reinforce",),
    "export": ("train",),
    "evaluate": ("export", "prepare"),
    "register": ("evaluate",),
}


def reads(stage: str) -> tuple[str, ...]:
    """The dotted parameter keys stage `stage` reads itself."""
    return READS[stage]


def lineage_reads(stage: str) -> list[str]:
    """The parameter keys `stage`'s output depends on (its own and its upstream stages'), in their shortest form:
    a key inside a listed section is dropped, and a section all of whose fields are listed stands for them."""
    keys: set[str] = set()
    todo = [stage]
    while todo:
        current = todo.pop()
        keys.update(READS[current])
        todo.extend(UPSTREAM[current])
    return sorted(_shortest(keys))


def _shortest(keys: set[str]) -> set[str]:
    changed = True
    while changed:
        changed = False
        parents = {k.rpartition(".")[0] for k in keys if "." in k}
        for parent in parents:
            fields = set(_section(parent).model_fields)
            if fields and {f"{parent}.{f}" for f in fields} <= keys:
                keys = {k for k in keys if not k.startswith(parent + ".")} | {parent}
                changed = True
    return {k for k in keys if not any(k.startswith(other + ".") for other in keys)}


def _section(dotted: str) -> Any:
    node: Any = Config
    for part in dotted.split("."):
        annotation = node.model_fields[part].annotation
        node = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
        if node is None:
            return type("Leaf", (), {"model_fields": {}})
    return node


def fingerprint(cfg: Config, *sections: str) -> str:
    """16 hex digits of the sha256 of the named config sections (dotted paths)."""
    dumped = cfg.model_dump(mode="json")
    picked = {}
    for section in sections:
        node: Any = dumped
        for part in section.split("."):
            node = node[part]
        picked[section] = node
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(cfg: Config, stage: str) -> str:
    """Where a pure stage's output lives: the fingerprint of every parameter it depends on."""
    return fingerprint(cfg, *lineage_reads(stage))
