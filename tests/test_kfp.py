"""The Kubeflow DAG (`pipelines/full.py`): the compiled YAML asks for what the cluster must provide (GPUs from
parameters, a memory-backed /dev/shm, placement, retries, the gate condition, caching only on pure steps, settings
and credentials as environment variables); bad parameters stop before anything is compiled or sent; an unreachable
or refusing endpoint gives one line; and the whole pipeline runs end to end under `kfp.local` with its shards in a
real S3 API (moto) and its runs and model in a real MLflow server."""
from __future__ import annotations

import builtins
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers_tiny import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "pipelines" / "full.py"


def _full(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FULL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kfp") / "full.yaml"
    done = _full("compile", "-o", str(out), "--image", "registry.example/lightclip:test", "--parallelism", "3",
                 "--shm-size", "8Gi")
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    return {"spec": docs[0], "platform": docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]}


def _executor(compiled: dict, component: str) -> str:
    return compiled["spec"]["components"][f"comp-{component}"]["executorLabel"]


def _tasks(compiled: dict) -> dict:
    """Every task of the DAG, including those inside the ParallelFor and the condition."""
    tasks = dict(compiled["spec"]["root"]["dag"]["tasks"])
    for comp in compiled["spec"]["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


# ---------------------------------------------------------------------------------------------- compiled YAML
def test_every_stage_is_a_task_on_the_project_image(compiled):
    tasks = _tasks(compiled)
    assert {"prepare", "teacher", "plan-reinforce", "reinforce", "publish-reinforced", "train", "export", "evaluate",
            "register"} <= set(tasks)
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in executors.values()}
    assert images == {"registry.example/lightclip:test"}
    for e in executors.values():  # lightweight components: nothing is pip-installed at run time
        assert "pip install" not in " ".join(e["container"].get("command", []))


def test_training_asks_for_gpus_shm_and_placement_from_parameters(compiled):
    train = compiled["spec"]["deploymentSpec"]["executors"][_executor(compiled, "train")]
    resources = train["container"]["resources"]
    # all of train_gpus when the task trains itself, none when it only launches a multi-node TrainJob
    assert resources["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--local-gpus-Output']}}"
    assert resources["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_resource']}}"
    assert "resourceMemoryLimit" in resources and "resourceCpuLimit" in resources
    k8s = compiled["platform"][_executor(compiled, "train")]
    assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi",
                                      "volumeName": "dshm"}]
    assert k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "node_selector"
    assert k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "tolerations"
    for name in ("prepare", "export", "evaluate"):  # only the training task holds GPUs and shm
        other = compiled["spec"]["deploymentSpec"]["executors"][_executor(compiled, name)]
        assert "accelerator" not in other["container"].get("resources", {})


def test_the_training_task_holds_gpus_only_when_it_trains_itself():
    sys.path.insert(0, str(ROOT))
    from components.train import local_gpus

    assert local_gpus.python_func(nodes=1, gpus=8) == 8
    assert local_gpus.python_func(nodes=4, gpus=8) == 0


def test_retries_caching_and_the_gate(compiled):
    tasks = _tasks(compiled)
    for name in ("prepare", "teacher", "reinforce", "publish-reinforced", "train", "export", "evaluate"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2, name
    assert "retryPolicy" not in tasks["register"]  # a retry would register a second version
    for name in ("prepare", "teacher", "plan-reinforce", "reinforce", "publish-reinforced"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name
    for name in ("train", "export", "evaluate", "register"):
        assert not tasks[name]["cachingOptions"].get("enableCache", False), name
    gate = next(t for t in tasks.values() if "triggerPolicy" in t)
    assert gate["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    assert "register" in compiled["spec"]["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-reinforce-Output"
    assert "reinforce" in compiled["spec"]["components"][loop["componentRef"]["name"]]["dag"]["tasks"]


def test_settings_and_credentials_come_from_configmap_and_secrets(compiled):
    for label, k8s in compiled["platform"].items():
        assert {c["configMapName"] for c in k8s["configMapAsEnv"]} == {"lightclip-mlflow"}, label
        assert {s["secretName"] for s in k8s["secretAsEnv"]} == {"lightclip-s3", "lightclip-mlflow-auth"}, label
        env = {kv["envVar"] for c in k8s["configMapAsEnv"] for kv in c["keyToEnv"]}
        assert "MLFLOW_TRACKING_URI" in env
        secret_env = {kv["envVar"] for s in k8s["secretAsEnv"] for kv in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_env


def test_pipeline_defaults_are_the_validated_params(compiled):
    from lightclip_core.config import load_config

    inputs = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    assert json.loads(inputs["params"]["defaultValue"]) == load_config(ROOT / "params.yaml").model_dump(mode="json")
    assert inputs["train_gpus"]["defaultValue"] == 1
    assert inputs["storage_root"]["defaultValue"].startswith("s3://")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("pair, field", [
    ("train.lr=-1", "train.lr"), ("reinforce_groups=0", "reinforce_groups"), ("train_gpus=two", "train_gpus"),
    ("no_such_setting=1", "no_such_setting"), ("tolerations=[1, 2]", "tolerations"), ("junk", "junk"),
])
def test_bad_parameters_stop_with_one_line_naming_the_field(tmp_path, pair, field):
    out = tmp_path / "full.yaml"
    done = _full("compile", "-o", str(out), "--param", pair)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], done.stderr
    assert not out.exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_line(tmp_path):
    started = time.monotonic()
    done = _full("submit", "--host", f"http://127.0.0.1:{_closed_port()}", "--experiment", "x")
    assert done.returncode == 3, done.stderr
    assert "unreachable" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.monotonic() - started < 90


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A KFP API that is healthy but refuses every run the way the real one does (JSON error body)."""

    def do_GET(self):
        if self.path.endswith("/healthz"):
            self._answer(200, {"multi_user": False})
        else:
            self._refuse()

    def _refuse(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer(400, {"error_message": "pipeline spec is invalid: forbidden by policy", "code": 3})

    def _answer(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = _refuse

    def log_message(self, *args):
        pass


def test_refused_run_is_one_line_with_the_reason():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = _full("submit", "--host", f"http://127.0.0.1:{server.server_address[1]}", "--experiment", "x")
    finally:
        server.shutdown()
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "rejected" in lines[0] and "400" in lines[0] and "forbidden by policy" in lines[0]


# ------------------------------------------------------------------------------------------ the whole DAG
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_whole_dag_runs_locally_and_registers_the_model(tmp_path, s3_env, mlflow_server, monkeypatch):
    """prepare -> teacher -> reinforce (2 groups + join) -> train -> export -> evaluate -> register under
    kfp.local's SubprocessRunner, shards and checkpoints in S3 (moto), runs and the model in a real MLflow server."""
    import boto3
    from kfp import local
    from mlflow import MlflowClient

    sys.path.insert(0, str(ROOT / "pipelines"))
    import full

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="pipeline")
    monkeypatch.chdir(tmp_path)
    for key, value in {"MLFLOW_TRACKING_URI": mlflow_server.uri, "LIGHTCLIP_WORKDIR": str(tmp_path / "work"),
                       "LIGHTCLIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["tracking"] = {**params["tracking"], "experiment": "kfp-local", "spool_dir": str(tmp_path / "spool"),
                          "system_metrics_interval_s": 0}
    params["registry"] = {**params["registry"], "model_name": "lightclip-kfp"}
    params["train"]["threads"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    arguments = full.pipeline_arguments(str(tmp_path / "params.yaml"),
                                        ["storage_root=s3://pipeline/lightclip", "reinforce_groups=2", "train_gpus=0"])
    pipeline = full.build_pipeline(arguments, parallelism=2, retries=0)  # fail fast here; retries are checked above

    # kfp.local 2.17 swaps builtins.print for an indenting one around each task, unsafely across the ParallelFor's
    # threads: two overlapping tasks can leave it swapped for good (every later print indented). Put it back after.
    monkeypatch.setattr(builtins, "print", builtins.print)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"),
               raise_on_error=True)
    started = time.monotonic()
    pipeline(**arguments)
    elapsed = time.monotonic() - started
    assert elapsed < 300, f"the tiny DAG took {elapsed:.0f} s"

    client = MlflowClient(mlflow_server.uri)
    versions = client.search_model_versions("name='lightclip-kfp'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias("lightclip-kfp", "champion").version == versions[0].version
    runs = client.search_runs([client.get_experiment_by_name("kfp-local").experiment_id])
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"prepare", "teacher", "reinforce", "train", "export", "evaluate", "register"} <= stages
    assert {r.data.tags.get("lightclip.orchestrator") for r in runs if r.data.tags.get("stage")} == {"kfp"}
    run_scoped = [r for r in runs if r.data.tags.get("stage") in ("train", "export", "evaluate", "register")]
    assert len({r.data.tags.get("kfp.run_id") for r in run_scoped}) == 1  # grouped under one KFP run
    assert len({r.data.tags.get("mlflow.parentRunId") for r in run_scoped}) == 1

    s3 = boto3.client("s3", endpoint_url=s3_env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="pipeline", Prefix="lightclip/")["Contents"]]
    metrics_key = next(k for k in keys if k.endswith("/eval/metrics.json"))
    metrics = json.loads(s3.get_object(Bucket="pipeline", Key=metrics_key)["Body"].read())
    assert "zeroshot/colour_shape/top1" in metrics and "retrieval/image_to_text/R@1" in metrics
    reinforced = [k for k in keys if "/reinforced/" in k and k.endswith(".tar")]
    manifest_key = next(k for k in keys if "/reinforced/" in k and k.endswith("/manifest.json"))
    manifest = json.loads(s3.get_object(Bucket="pipeline", Key=manifest_key)["Body"].read())
    assert manifest["reinforcement"]["complete"] and len(manifest["shards"]) == len(reinforced) == 2
    assert any(k.endswith("/train/final.pt") for k in keys) and any(k.endswith("/export/model.safetensors")
                                                                   for k in keys)

    root = tmp_path / "kfp-root"  # the typed artifacts a stakeholder sees in the UI
    evaluated = json.loads(next(root.rglob("evaluate/executor_output.json")).read_text())
    artifacts = {name: a["artifacts"][0]["metadata"] for name, a in evaluated["artifacts"].items()}
    assert artifacts["metrics"]["zeroshot/colour_shape/top1"] == pytest.approx(metrics["zeroshot/colour_shape/top1"])
    matrix = artifacts["confusion"]["confusionMatrix"]
    assert artifacts["confusion"]["task"] == "colour_shape" and len(matrix["rows"]) == len(matrix["annotationSpecs"])
    assert sum(sum(r["row"]) for r in matrix["rows"]) == metrics["num_test_samples"]
    assert evaluated["parameterValues"]["Output"] is True and artifacts["report"]["passed"] is True
    assert next(root.rglob("evaluate/report")).read_text().startswith("#")
    assert next(root.rglob("register/decision")).read_text().strip()
    assert not [p for p in root.rglob("*.tar")], "shards must stay in object storage, not travel as artifacts"


# ------------------------------------------------------------------------------------------ stage helpers
@pytest.mark.parametrize("shards, groups", [(1, 4), (2, 2), (7, 3), (16, 4), (10, 10), (5, 1)])
def test_shard_groups_cover_every_shard_once_in_contiguous_non_empty_ranges(tmp_path, shards, groups):
    from types import SimpleNamespace

    from lightclip_core.pipeline.bodies import shard_groups

    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"url": f"s{i}.tar"} for i in range(shards)]}))
    ranges = [tuple(map(int, r.split(":"))) for r in shard_groups(SimpleNamespace(path=str(tmp_path)), groups)]
    assert len(ranges) == min(shards, groups)
    assert [i for a, b in ranges for i in range(a, b)] == list(range(shards))
    assert all(b > a for a, b in ranges) and max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_pure_stage_locations_follow_only_the_parameters_they_read():
    from lightclip_core.config import validate
    from lightclip_core.stages.params import stage_fingerprint

    base = validate({})
    for stage in ("prepare", "teacher", "reinforce"):
        assert stage_fingerprint(base, stage) == stage_fingerprint(validate({"train": {"lr": 0.5}}), stage)
        assert stage_fingerprint(base, stage) != stage_fingerprint(validate({"data": {"seed": 7}}), stage)
    assert stage_fingerprint(base, "prepare") == stage_fingerprint(validate({"reinforce": {"seed": 3}}), "prepare")
    assert stage_fingerprint(base, "reinforce") != stage_fingerprint(validate({"reinforce": {"seed": 3}}), "reinforce")
