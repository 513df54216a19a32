"""The compiled Kubeflow pipeline keeps its shape: its components, their inputs and outputs, the pipeline's
parameters, each task's caching option, retries, triggers, iterators and dependencies, and each executor's image and
resources. The reference `tests/data/kfp_structure.json` was written from the pipeline as it compiled before the
stage functions were moved under `lightclip_core.stages`; a change to the DAG that is meant updates it with
`python tests/test_kfp_structure.py --update` (and says why in the commit)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).resolve().parent / "data" / "kfp_structure.json"


def _io(component: dict) -> dict:
    out = {}
    for key in ("inputDefinitions", "outputDefinitions"):
        defn = component.get(key) or {}
        params = sorted([name, v.get("parameterType")] for name, v in defn.get("parameters", {}).items())
        artifacts = sorted([name, v["artifactType"]["schemaTitle"]] for name, v in defn.get("artifacts", {}).items())
        out[key] = params + artifacts
    return out


def _tasks(dag: dict) -> dict:
    return {name: {"component": t["componentRef"]["name"], "cache": t.get("cachingOptions", {}),
                   "deps": sorted(t.get("dependentTasks", [])), "retry": t.get("retryPolicy"),
                   "trigger": t.get("triggerPolicy"), "iterator": t.get("parameterIterator"),
                   "inputs": json.dumps(t.get("inputs", {}), sort_keys=True)}
            for name, t in dag.get("tasks", {}).items()}


def structure(tmp: Path) -> dict:
    """What the compiled YAML says about the DAG, without the components' embedded source code."""
    sys.path.insert(0, str(ROOT))
    from pipelines.full import compile_pipeline

    docs = list(yaml.safe_load_all(Path(compile_pipeline(tmp / "full.yaml", str(ROOT / "params.yaml"), None,
                                                          [])).read_text()))
    spec = docs[0]
    return json.loads(json.dumps({
        "components": {name: {"io": _io(c), "dag": _tasks(c["dag"]) if "dag" in c else None,
                              "executor": c.get("executorLabel")} for name, c in spec["components"].items()},
        "root": {"io": _io(spec["root"]), "dag": _tasks(spec["root"]["dag"])},
        "executors": {name: {"image": e["container"]["image"], "resources": e["container"].get("resources")}
                      for name, e in spec["deploymentSpec"]["executors"].items()},
        "platform": docs[1] if len(docs) > 1 else None,
    }, sort_keys=True, default=str))


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}/{key}: only in {'the compiled pipeline' if key in b else 'the reference'}"
            found = _first_difference(a[key], b[key], f"{path}/{key}")
            if found:
                return found
        return None
    return None if a == b else f"{path}: reference {a!r}, compiled {b!r}"


def test_the_compiled_dag_keeps_its_components_parameters_and_caching(tmp_path: Path) -> None:
    reference = json.loads(SNAPSHOT.read_text())
    compiled = structure(tmp_path)
    assert _first_difference(reference, compiled) is None
    assert len(compiled["components"]) == 12


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(json.dumps(structure(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
