"""Offline validation of a custom resource (TrainJob, TrainingRuntime) against its CRD's `openAPIV3Schema`.

No API server runs where the manifests are written, so this does what the server's structural-schema check would:
the OpenAPI v3 schema is turned into a JSON Schema and checked with `jsonschema`, with the Kubernetes extensions
treated as the server treats them:

- `x-kubernetes-int-or-string`: an integer or a string (the schema's `anyOf` already says so; `type` is dropped);
- an object schema with `properties`, no `additionalProperties` and no `x-kubernetes-preserve-unknown-fields`
  rejects unknown fields (the server would prune them silently, and `kubectl --validate=strict` rejects them:
  a misspelt field is always a bug here);
- `x-kubernetes-list-type: map` checks the list-map keys are unique, `set` that the items are;
- `format: int32/int64` checks the range; `nullable: true` admits null;
- `x-kubernetes-validations` (CEL): the rule forms the vendored Trainer CRDs use are evaluated by a small
  translator (below); transition rules (`oldSelf`) do not apply on create and pass; any other rule fails
  loudly, so an unknown rule is never skipped silently.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml


class CustomResourceInvalid(ValueError):
    """A custom resource does not satisfy its CRD schema. The message is one line: path and reason."""


def load_crd(path: str | Path) -> dict[str, Any]:
    """The CustomResourceDefinition in a YAML file (the vendored files carry a licence header comment)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ValueError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return crds[0]


def crd_kind(crd: dict[str, Any]) -> tuple[str, str]:
    """(`group/version` of the stored version, kind)."""
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    return f"{crd['spec']['group']}/{version}", crd["spec"]["names"]["kind"]


# ------------------------------------------------------------------------------------ schema translation
def _to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if k != "description"}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


def _format_checker():
    import jsonschema

    checker = jsonschema.FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        checker.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


def _list_type(validator, list_type, instance, schema) -> Iterator[Any]:
    import jsonschema

    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[tuple] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map key {dict(zip(keys, key))}")
            seen.add(key)
    elif list_type == "set":
        reprs = [repr(x) for x in instance]
        if len(set(reprs)) != len(reprs):
            yield jsonschema.ValidationError("duplicate items in a list of type set")


# ------------------------------------------------------------------------------------ the CEL subset
_PATH = r"self(?:\.[A-Za-z_]\w*)*"
_MISSING = object()


def _get(value: Any, path: str) -> Any:
    for part in path.split(".")[1:]:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _compare(left: Any, op: str, right: int) -> bool:
    return {"<=": left <= right, ">=": left >= right, "<": left < right, ">": left > right, "==": left == right}[op]


def _atom(rule: str) -> Callable[[Any], bool] | None:
    """A predicate on `self` for one CEL expression of the forms the Trainer CRDs use; None if not one."""
    if rule == "self == oldSelf" or "oldSelf" in rule:
        return lambda _: True  # a transition rule: checked on update only
    if m := re.fullmatch(rf"({_PATH})\.matches\('([^']*)'\)", rule):
        path, pattern = m.groups()
        return lambda s: isinstance(_get(s, path), str) and re.search(pattern, _get(s, path)) is not None
    if m := re.fullmatch(rf"size\(({_PATH})\) (<=|>=|==|<|>) (\d+)", rule):
        path, op, n = m.groups()
        return lambda s: _get(s, path) is not _MISSING and _compare(len(_get(s, path)), op, int(n))
    if m := re.fullmatch(r"self (<=|>=|==|<|>) (-?\d+)", rule):
        op, n = m.groups()
        return lambda s: _compare(s, op, int(n))
    if m := re.fullmatch(r"self == '([^']*)'", rule):
        return lambda s, text=m.group(1): s == text
    if m := re.fullmatch(r"self in \[((?:'[^']*'(?:, ?)?)+)\]", rule):
        allowed = re.findall(r"'([^']*)'", m.group(1))
        return lambda s: s in allowed
    if m := re.fullmatch(rf"has\(({_PATH})\)", rule):
        return lambda s, path=m.group(1): _get(s, path) is not _MISSING
    if m := re.fullmatch(rf"\[((?:has\({_PATH}\),? ?)+)\]\.filter\(x, x\)\.size\(\) <= (\d+)", rule):
        paths, n = re.findall(rf"has\(({_PATH})\)", m.group(1)), int(m.group(2))
        return lambda s: sum(_get(s, p) is not _MISSING for p in paths) <= n
    if m := re.fullmatch(r"!self\.exists\((\w+), \1 == '([^']*)'\)", rule):
        return lambda s, text=m.group(2): text not in s
    return _HAND_TRANSLATED.get(rule)


# Rules with nested quantifiers, translated by hand (each appears verbatim in the vendored runtime CRDs).
_HAND_TRANSLATED: dict[str, Callable[[Any], bool]] = {
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))":
        lambda s: not ((s.get("startupPolicy") or {}).get("startupPolicyOrder") == "InOrder"
                       and any("dependsOn" in j for j in s.get("replicatedJobs", []))),
    "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)":
        lambda s: all(not (t.get("metadata") or {}).get("namespace") for t in s.get("templates", [])),
}


def cel_predicate(rule: str) -> Callable[[Any], bool] | None:
    """The predicate for a rule (a `||` of supported atoms counts), or None when the rule is not supported."""
    rule = " ".join(rule.split())
    if (whole := _atom(rule)) is not None:
        return whole
    parts = [_atom(p) for p in rule.split(" || ")]
    if len(parts) > 1 and all(p is not None for p in parts):
        return lambda s: any(p(s) for p in parts)
    return None


def _cel_rules(validator, rules, instance, schema) -> Iterator[Any]:
    import jsonschema

    for rule in rules:
        predicate = cel_predicate(rule["rule"])
        if predicate is None:
            yield jsonschema.ValidationError(f"CEL rule not supported offline: {rule['rule']!r}")
            continue
        try:
            ok = predicate(instance)
        except (TypeError, AttributeError) as err:
            ok, rule = False, {**rule, "message": f"{rule.get('message', rule['rule'])} ({err})"}
        if not ok:
            yield jsonschema.ValidationError(rule.get("message") or f"failed rule {rule['rule']!r}")


def cel_rules_in(schema: Any) -> Iterator[str]:
    """Every CEL rule in a schema tree (to check that each is supported)."""
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            yield rule["rule"]
        for key, value in schema.items():
            if key != "x-kubernetes-validations":
                yield from cel_rules_in(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from cel_rules_in(item)


# ------------------------------------------------------------------------------------ the validator
class CustomResourceValidator:
    """Validates objects of one CRD's kind. `errors(obj)` lists one-line messages; `validate(obj)` raises."""

    def __init__(self, crd: dict[str, Any]):
        import jsonschema

        self.api_version, self.kind = crd_kind(crd)
        version = self.api_version.split("/")[1]
        raw = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
        self.openapi_schema = raw
        schema = _to_json_schema(copy.deepcopy(raw))
        cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {
            "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})
        self._validator = cls(schema, format_checker=_format_checker())

    def errors(self, obj: dict[str, Any]) -> list[str]:
        found = []
        if obj.get("apiVersion") != self.api_version or obj.get("kind") != self.kind:
            found.append(f"apiVersion/kind: expected {self.api_version} {self.kind}, got "
                         f"{obj.get('apiVersion')} {obj.get('kind')}")
        for err in sorted(self._validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            where = ".".join(str(p) for p in err.absolute_path) or "<root>"
            found.append(f"{where}: {' '.join(err.message.split())[:300]}")
        return found

    def validate(self, obj: dict[str, Any]) -> None:
        if found := self.errors(obj):
            name = (obj.get("metadata") or {}).get("name")
            raise CustomResourceInvalid(f"{self.kind} {name!r} invalid: {found[0]}"
                                        + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
