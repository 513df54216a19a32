"""The base of every parameter section: strict pydantic models and the one error a bad parameter raises."""
from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A parameter is invalid. The message is one line: field, value, what is allowed."""


def _leaf_types(annotation: Any) -> set[Any]:
    """The scalar types a field's annotation takes, through Annotated, unions (Optional), lists and tuples."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple):
        return set().union(*(_leaf_types(a) for a in get_args(annotation) if a not in (type(None), Ellipsis)))
    return {annotation}


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value))


class Section(BaseModel):
    """A section of params.yaml: unknown keys are errors, assignments are validated, every float is finite (no field
    means anything by inf or nan; an optional bound or gate is switched off by null), and a field of numbers takes
    no booleans (pydantic would read `true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if _holds_bool(value) and info.field_name is not None:
            leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
            if leaves and leaves <= {int, float}:
                raise ValueError(f"expected {'an integer' if leaves == {int} else 'a number'}, not a boolean")
        return value


def drop_nulls(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` without its null values (a null counts as an absent key), recursively."""
    return {k: drop_nulls(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated with `extra`, nested sections merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
