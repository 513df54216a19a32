"""Reading params files and `--set` values: YAML that refuses a key given twice, and one-line errors.

A params file that is missing, a directory, not UTF-8, not YAML, empty or not a mapping is a ConfigError naming the
file; a YAML problem is reported as one line with its line and column (PyYAML's own message spans several lines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lightclip_core.infra.schema import ConfigError


class _ParamsLoader(yaml.SafeLoader):
    """yaml.safe_load's reading, except that a key given twice in one mapping is an error: safe_load would keep the
    last one silently (a second `train:` section replacing the first)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges and overrides on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r} on line {key_node.start_mark.line + 1} (first on line "
                                f"{first_line[key] + 1}); give each key once")
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader


def yaml_problem(err: yaml.YAMLError, with_line: bool = True) -> str:
    """One line of a YAML error: the problem and where (PyYAML's own message spans several lines)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        text = f"{err.context}, {err.problem}" if err.context else err.problem
        mark = err.problem_mark
        if mark is None:
            return text
        return f"{text} ({f'line {mark.line + 1}, ' if with_line else ''}column {mark.column + 1})"
    return (str(err).splitlines() or [type(err).__name__])[0]


def read_params_file(p: Path) -> dict[str, Any]:
    """The mapping a params file holds; anything else (no file, a directory, not UTF-8, not YAML, a key given twice,
    empty, not a mapping) is a ConfigError naming the file."""
    name = repr(str(p))
    if p.is_dir():
        raise ConfigError(f"params file {name} is a directory; expected a YAML file such as params.yaml")
    if not p.exists():
        raise ConfigError(f"params file {name} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"params file {name} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start})") from None
    except OSError as err:  # not readable: permissions, a special file
        raise ConfigError(f"params file {name} cannot be read: {err.strerror or type(err).__name__}") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {name} is not valid YAML: {yaml_problem(err)}") from None
    if raw is None:
        raise ConfigError(f"params file {name} is empty; expected a mapping of sections (data, model, train, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"params file {name}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw
