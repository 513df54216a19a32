"""The base of every parameter section: strict pydantic models and the one error a bad parameter raises."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A parameter is invalid. The message is one line: field, value, what is allowed."""


class Section(BaseModel):
    """A section of params.yaml: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def drop_nulls(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` without its null values (a null counts as an absent key), recursively."""
    return {k: drop_nulls(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated with `extra`, nested sections merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
