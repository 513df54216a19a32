"""The compiled Kubeflow pipeline keeps its shape: its components, their inputs and outputs, the pipeline's
parameters, each task's caching option, retries, triggers, iterators and dependencies, and each executor's image and
resources. The reference `tests/data/kfp_structure.json` was written from the pipeline as it compiled before the
stage functions were moved under `lightclip_core.stages`; a change to the DAG that is meant updates it with
`python tests/test_kfp_structure.py --update` (and says why in the commit).

Every task also asks for CPU and memory (requests and limits, from params.yaml's `resources`), runs as the images'
non-root user, carries the pod label the MLflow NetworkPolicy admits and gets the MLflow login from its Secret."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lightclip_core.config import Config, load_config
from lightclip_core.launch import manifests as launcher
from lightclip_core.resources_config import cpu_cores, memory_bytes

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


def compiled(tmp: Path, pairs: list[str] | None = None) -> list[dict]:
    """The pipeline compiled from params.yaml (and `--param` pairs): the pipeline spec and its platform config."""
    sys.path.insert(0, str(ROOT))
    from pipelines.full import compile_pipeline

    return list(yaml.safe_load_all(Path(compile_pipeline(tmp / "full.yaml", str(ROOT / "params.yaml"), None,
                                                         pairs or [])).read_text()))


def structure(tmp: Path, docs: list[dict] | None = None) -> dict:
    """What the compiled YAML says about the DAG, without the components' embedded source code."""
    docs = docs or compiled(tmp)
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


@pytest.fixture(scope="module")
def default_docs(tmp_path_factory) -> list[dict]:
    return compiled(tmp_path_factory.mktemp("kfp"))


def test_the_compiled_dag_keeps_its_components_parameters_and_caching(tmp_path: Path, default_docs) -> None:
    reference = json.loads(SNAPSHOT.read_text())
    compiled_structure = structure(tmp_path, default_docs)
    assert _first_difference(reference, compiled_structure) is None
    assert len(compiled_structure["components"]) == 12


# ------------------------------------------------------------------------------------------------ hardening
# each task's section of params.yaml's `resources` (the bookkeeping tasks share `control`)
TASK_RESOURCES = {"prepare": "prepare", "teacher": "teacher", "plan-reinforce": "control", "reinforce": "reinforce",
                  "publish-reinforced": "control", "local-gpus": "control", "train": "train", "export": "export",
                  "evaluate": "evaluate", "register": "registry"}


def executors(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Task (component) name -> (its container spec, its Kubernetes platform config)."""
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {name.removeprefix("comp-"): (spec["deploymentSpec"]["executors"][c["executorLabel"]]["container"],
                                         platform.get(c["executorLabel"], {}))
            for name, c in spec["components"].items() if "executorLabel" in c}


def test_every_task_asks_for_cpu_and_memory_requests_and_limits_from_params(default_docs) -> None:
    tasks = executors(default_docs)
    assert set(tasks) == set(TASK_RESOURCES)
    sizes = load_config(ROOT / "params.yaml").resources
    for task, (container, _) in tasks.items():
        wanted = getattr(sizes, TASK_RESOURCES[task])
        got = container["resources"]
        assert (got["resourceCpuRequest"], got["resourceCpuLimit"]) == (wanted.cpu_request, wanted.cpu_limit), task
        assert (got["resourceMemoryRequest"], got["resourceMemoryLimit"]) == (wanted.memory_request,
                                                                              wanted.memory_limit), task


def test_every_task_runs_as_the_images_non_root_user_with_the_mlflow_login(default_docs) -> None:
    for task, (_, k8s) in executors(default_docs).items():
        # all kfp 2.17 can set; the KFP backend adds allowPrivilegeEscalation, drop ALL, seccomp (docs/KUBEFLOW.md)
        context = k8s["securityContext"]  # int64 fields are JSON strings in the compiled YAML
        assert (int(context["runAsUser"]), int(context["runAsGroup"]), context["runAsNonRoot"]) == (
            launcher.RUN_AS_USER, launcher.RUN_AS_USER, True), task
        assert k8s["podMetadata"]["labels"][launcher.MLFLOW_CLIENT_LABEL] == "true", task  # the NetworkPolicy's
        (login,) = [s for s in k8s["secretAsEnv"] if s["secretName"] == launcher.DEFAULT_MLFLOW_AUTH_SECRET]
        assert {kv["envVar"] for kv in login["keyToEnv"]} == set(launcher.MLFLOW_AUTH_SECRET_KEYS), task
        assert not login.get("optional", False), task  # the tracking server refuses anonymous clients


def test_a_resources_override_reaches_the_compiled_tasks(tmp_path: Path) -> None:
    docs = compiled(tmp_path, ["resources.train.memory_request=96Gi", "resources.train.memory_limit=128Gi",
                               "resources.control.cpu_limit=2"])
    tasks = executors(docs)
    assert tasks["train"][0]["resources"]["resourceMemoryLimit"] == "128Gi"
    assert tasks["train"][0]["resources"]["resourceMemoryRequest"] == "96Gi"
    assert {tasks[t][0]["resources"]["resourceCpuLimit"] for t in ("plan-reinforce", "local-gpus")} == {"2"}


@pytest.mark.parametrize("pair, message", [
    ("resources.train.cpu_request=32", "resources.train: cpu_request 32 is above cpu_limit 16"),
    ("resources.prepare.memory_limit=512m", "resources.prepare.memory_limit='512m': not a memory quantity"),
    ("resources.export.cpu_limit=two", "resources.export.cpu_limit='two': not a CPU quantity"),
    ("resources.evaluate.memory_request=0", "resources.evaluate.memory_request=0: must be more than 0"),
    ("resources.register.cpu_limit=1", "resources.register: unknown key"),
])
def test_bad_resources_stop_the_compile_with_one_line_naming_the_field(tmp_path: Path, capsys, pair: str,
                                                                       message: str) -> None:
    from pipelines.full import EXIT_BAD_INPUT, main

    assert main(["compile", "-o", str(tmp_path / "full.yaml"), "--param", pair]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "full.yaml").exists()


@pytest.mark.parametrize("text, cores", [("500m", 0.5), ("2", 2.0), ("0.25", 0.25), ("16", 16.0)])
def test_cpu_quantities(text: str, cores: float) -> None:
    assert cpu_cores(text) == cores


@pytest.mark.parametrize("text, size", [("512Mi", 512 * 2**20), ("8Gi", 8 * 2**30), ("2G", 2 * 10**9), ("1024", 1024)])
def test_memory_quantities(text: str, size: int) -> None:
    assert memory_bytes(text) == size


def test_the_default_resources_are_those_of_params_yaml() -> None:
    assert load_config(ROOT / "params.yaml").resources == Config().resources


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(json.dumps(structure(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
