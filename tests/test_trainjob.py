"""The multi-node launcher: the TrainJob it builds satisfies the vendored Kubeflow Trainer CRD, bad input stops it
before any API call, and submit / wait / cancel behave against a fake API server.

The fake sits under the real `kubernetes` client: `FakeApiServer` is an `ApiClient` whose HTTP `request` is answered
in memory, so the real `CustomObjectsApi` / `CoreV1Api` build the URLs, check the keyword arguments, serialize the
bodies and deserialize the answers. Every body it receives is validated (TrainJob: the CRD's openAPIV3Schema;
ConfigMap: kubernetes-validate, strict), and every TrainJob it returns, status included, is validated too.
"""
from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from lightclip_core.config import load_config
from lightclip_core.launch import command
from lightclip_core.launch.crd_schema import CustomResourceValidator, cel_predicate, cel_rules_in, load_crd
from lightclip_core.launch.manifests import (AlreadyExists, ApiUnavailable, LaunchConfigError, LaunchError,
                                             TrainJobFailed, TrainJobSpec, TrainJobTimeout, build_trainjob, load_params,
                                             required_permissions)
from lightclip_core.launch.trainjob import TrainJobLauncher

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "infra" / "crds"
K8S_VERSION = "1.32.0"
NOW = "2026-11-23T10:00:00Z"


@pytest.fixture(scope="module")
def trainjob_schema() -> CustomResourceValidator:
    return CustomResourceValidator(load_crd(CRDS / "trainer.kubeflow.org_trainjobs.yaml"))


def make_spec(**overrides) -> TrainJobSpec:
    fields = dict(name="lc-run", namespace="ml", image="registry.example/lightclip:cuda-0.1.0",
                  data="/workspace/reinforced/train", out="/workspace/train", nodes=2, gpus_per_node=4,
                  workspace_pvc="lightclip-workspace")
    return TrainJobSpec(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------ fake server
class _Response:
    def __init__(self, status: int, payload, reason: str = "OK"):
        self.status, self.reason = status, reason
        self.data = payload if isinstance(payload, str) else json.dumps(payload)

    def getheaders(self):
        return {"Content-Type": "application/json"}

    def getheader(self, name, default=None):
        return self.getheaders().get(name, default)


def _status_error(code: int, reason: str, message: str) -> ApiException:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return ApiException(http_resp=_Response(code, body, reason=reason))


def condition(type_: str, status: str = "True", reason: str = "JobSetCompleted", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": NOW}


def jobs_status(active=0, ready=0, succeeded=0, failed=0) -> list[dict]:
    return [{"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
             "suspended": 0}]


class FakeApiServer(k8s.ApiClient):
    """The API server's answers to the requests the real client sends; records (verb, group, resource) per call."""

    def __init__(self, trainjob_schema: CustomResourceValidator):
        super().__init__(k8s.Configuration(host="https://fake-apiserver"))
        self.schema = trainjob_schema
        self.trainjobs: dict[tuple[str, str], dict] = {}
        self.configmaps: dict[tuple[str, str], dict] = {}
        self.statuses: dict[str, list[dict]] = {}  # scripted .status per TrainJob, one per GET (last one repeats)
        self.pods: list[dict] = []
        self.logs: dict[str, str] = {}
        self.fail: dict[tuple[str, str], ApiException] = {}  # (verb, resource) -> error to raise
        self.unreachable = False
        self.calls: list[tuple[str, str, str, str]] = []  # (method, verb, api group, resource)

    # -- routing
    def request(self, method, url, query_params=None, headers=None, post_params=None, body=None,
                _preload_content=True, _request_timeout=None):
        if self.unreachable:
            raise urllib3.exceptions.MaxRetryError(None, url, urllib3.exceptions.NewConnectionError(
                None, "Failed to establish a new connection: [Errno 111] Connection refused"))
        parts = urlparse(url).path.strip("/").split("/")
        query = dict(query_params or [])
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        assert rest[0] == "namespaces", url
        namespace, resource, name, sub = rest[1], rest[2], (rest[3:4] or [None])[0], (rest[4:5] or [None])[0]
        verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(method) or (
            "get" if name else ("watch" if query.get("watch") else "list"))
        rbac_resource = f"{resource}/{sub}" if sub else resource
        self.calls.append((method, verb, group, rbac_resource))
        if (verb, rbac_resource) in self.fail:
            raise self.fail[(verb, rbac_resource)]
        handler = getattr(self, f"_{verb}_{rbac_resource.replace('/', '_')}")
        return handler(namespace, name, body, query)

    # -- trainjobs
    def _create_trainjobs(self, namespace, _, body, __):
        errors = self.schema.errors(body)
        assert not errors, errors  # the launcher must never send an invalid TrainJob
        assert body["metadata"]["namespace"] == namespace
        key = (namespace, body["metadata"]["name"])
        if key in self.trainjobs:
            raise _status_error(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{key[1]}" already exists')
        stored = json.loads(json.dumps(body))
        stored["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1", generation=1, creationTimestamp=NOW)
        self.trainjobs[key] = stored
        return _Response(201, stored, "Created")

    def _get_trainjobs(self, namespace, name, _, __):
        if (namespace, name) not in self.trainjobs:
            raise _status_error(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        job = json.loads(json.dumps(self.trainjobs[(namespace, name)]))
        script = self.statuses.get(name, [])
        if script:
            job["status"] = script.pop(0) if len(script) > 1 else script[0]
        errors = self.schema.errors(job)
        assert not errors, errors  # scripted statuses are shaped like the controller's
        return _Response(200, job)

    def _delete_trainjobs(self, namespace, name, _, query):
        assert query.get("propagationPolicy") in (None, "Foreground", "Background", "Orphan")
        if self.trainjobs.pop((namespace, name), None) is None:
            raise _status_error(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        return _Response(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    # -- configmaps, pods
    def _create_configmaps(self, namespace, _, body, __):
        kubernetes_validate.validate(body, K8S_VERSION, strict=True)
        key = (namespace, body["metadata"]["name"])
        if key in self.configmaps:
            raise _status_error(409, "AlreadyExists", f'configmaps "{key[1]}" already exists')
        for ref in body["metadata"].get("ownerReferences", []):  # an owner must exist in the same namespace
            owner = self.trainjobs.get((namespace, ref["name"]))
            assert owner is not None and owner["metadata"]["uid"] == ref["uid"], ref
        self.configmaps[key] = body
        return _Response(201, {**body, "metadata": {**body["metadata"], "uid": str(uuid.uuid4())}}, "Created")

    def _delete_configmaps(self, namespace, name, _, __):
        if self.configmaps.pop((namespace, name), None) is None:
            raise _status_error(404, "NotFound", f'configmaps "{name}" not found')
        return _Response(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def _list_pods(self, namespace, _, __, query):
        key, value = query["labelSelector"].split("=")
        items = [p for p in self.pods if p["metadata"]["namespace"] == namespace
                 and p["metadata"]["labels"].get(key) == value]
        return _Response(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def _get_pods_log(self, namespace, name, _, __):
        return _Response(200, self.logs[name])

    def add_failed_pod(self, job: str, index: int, exit_code: int, reason: str) -> str:
        name = f"{job}-node-0-{index}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "ml",
                            "labels": {"jobset.sigs.k8s.io/jobset-name": job,
                                       "batch.kubernetes.io/job-completion-index": str(index)}},
               "spec": {"containers": [{"name": "node", "image": "registry.example/lightclip:cuda-0.1.0"}]},
               "status": {"phase": "Failed", "containerStatuses": [{
                   "name": "node", "ready": False, "restartCount": 0, "image": "lightclip", "imageID": "sha256:0",
                   "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}]}}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        self.pods.append(pod)
        return name


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(trainjob_schema) -> FakeApiServer:
    return FakeApiServer(trainjob_schema)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def launcher(server, clock) -> TrainJobLauncher:
    return TrainJobLauncher(k8s.CustomObjectsApi(server), k8s.CoreV1Api(server), poll_s=5, sleep=clock.sleep,
                            clock=clock)


PARAMS_TEXT = yaml.safe_dump({"train": {"lr": 0.001}})


# ------------------------------------------------------------------------------------------------ the manifest
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (2, 8), (4, 4), (16, 8), (3, 0)])
def test_trainjob_satisfies_the_vendored_crd_for_every_shape(trainjob_schema, nodes, gpus):
    spec = make_spec(nodes=nodes, gpus_per_node=gpus, procs_per_node=None if gpus else 4,
                     node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     active_deadline_s=86400)
    body = build_trainjob(spec)
    assert trainjob_schema.errors(body) == []
    trainer = body["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, gpus or 4)
    limits = trainer["resourcesPerNode"].get("limits", {})
    assert limits.get("nvidia.com/gpu") == (gpus or None)


def test_trainjob_runs_torchrun_on_the_mounted_params_with_env_by_reference():
    body = build_trainjob(make_spec())
    trainer = body["spec"]["trainer"]
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"][:3] == ["--module", "lightclip_core.cli", "train"]
    args = dict(zip(trainer["args"][3::2], trainer["args"][4::2]))
    assert args == {"--params": "/etc/lightclip/params.yaml", "--data": "/workspace/reinforced/train",
                    "--out": "/workspace/train"}
    assert body["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                          "name": "lightclip-torch"}
    refs = {e["name"]: e["valueFrom"] for e in trainer["env"]}
    assert refs["MLFLOW_TRACKING_URI"] == {"configMapKeyRef": {"name": "lightclip-mlflow",
                                                               "key": "MLFLOW_TRACKING_URI"}}
    assert refs["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "lightclip-s3"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # required: MLflow refuses anonymous clients
        assert refs[name] == {"secretKeyRef": {"name": "lightclip-mlflow-auth", "key": name}}
    assert all("value" not in e for e in trainer["env"])  # no literal values, so no secret in the object
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 4},
                                           "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 4}}
    assert not {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"} & set(refs)
    (patch,) = body["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["params"]["configMap"]["name"] == "lc-run-params"
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert container["name"] == "node" and mounts["/dev/shm"] == "dshm" and mounts["/etc/lightclip"] == "params"
    assert mounts["/workspace"] == "workspace"
    # a read-only root file system: /tmp (also HOME) is the writable place; tests/test_infra.py checks the standard
    assert volumes[mounts["/tmp"]]["emptyDir"] == {} and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_shipped_params_are_the_validated_parameters_with_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    cfg, text = load_params(params, ["train.lr=0.0005"])
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(text)
    assert load_config(shipped) == cfg  # the pods read back exactly the validated configuration
    assert cfg.train.lr == 0.0005


def test_the_validator_rejects_unknown_fields_and_cel_violations(trainjob_schema):
    body = build_trainjob(make_spec())
    body["metadata"]["name"] = "Bad_Name"
    body["spec"]["trainer"]["numProcPerNode"] = 0
    body["spec"]["trainer"]["numNode"] = 2
    errors = " | ".join(trainjob_schema.errors(body))
    assert "RFC 1035" in errors and "numProcPerNode must be greater than or equal to 1" in errors
    assert "'numNode' was unexpected" in errors


def test_every_cel_rule_of_the_trainjob_crd_is_evaluated(trainjob_schema):
    unsupported = [r for r in set(cel_rules_in(trainjob_schema.openapi_schema)) if cel_predicate(r) is None]
    assert unsupported == []


# ------------------------------------------------------------------------------------------------ bad input
def cli_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightclip")
    command.add_trainjob_command(parser.add_subparsers(dest="command"))
    params = tmp_path / "params.yaml"
    if not params.exists():
        params.write_text((REPO / "params.yaml").read_text())
    base = ["trainjob", "--params", str(params), "--nodes", "2", "--gpus-per-node", "8", "--image",
            "registry.example/lightclip:cuda-0.1.0", "--data", "/workspace/d", "--out", "/workspace/o",
            "--namespace", "ml", "--name", "lc-run"]
    return parser.parse_args(base + list(extra))


@pytest.mark.parametrize("extra,field", [
    (["--nodes", "0"], "nodes=0"),
    (["--image", ""], "image=''"),
    (["--gpus-per-node", "-1"], "gpus_per_node=-1"),
    (["--name", "Not_A_Label"], "name='Not_A_Label'"),
    (["--set", "train.lr=-1"], "train.lr=-1"),
    (["--set", "train.no_such_key=1"], "train.no_such_key"),
    (["--memory", "lots"], "memory='lots'"),
    (["--memory", "500m"], "did you mean 500Mi?"),  # milli-bytes, a common slip
    (["--cpu", "8x"], "cpu='8x'"),
])
def test_bad_input_stops_before_any_api_call_with_one_line(tmp_path, server, capsys, extra, field):
    code = command.run_trainjob(cli_args(tmp_path, *extra), k8s.CustomObjectsApi(server), k8s.CoreV1Api(server))
    err = capsys.readouterr().err
    assert code == command.EXIT_BAD_INPUT
    assert server.calls == []
    assert err.count("\n") == 1 and field in err


def test_bad_params_value_in_the_file_is_reported_before_any_call(tmp_path, server, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"lr": "fast"}}))
    code = command.run_trainjob(cli_args(tmp_path), k8s.CustomObjectsApi(server), k8s.CoreV1Api(server))
    assert code == 2 and server.calls == []
    assert "train.lr='fast'" in capsys.readouterr().err


def test_spec_check_names_the_field():
    with pytest.raises(LaunchConfigError, match=r"^nodes=0: "):
        make_spec(nodes=0).check()
    with pytest.raises(LaunchConfigError, match=r"^procs_per_node=2: must equal gpus_per_node=4"):
        make_spec(procs_per_node=2).check()
    with pytest.raises(LaunchConfigError, match=r"^name="):  # pod names `<name>-node-0-<index>` must fit 63
        make_spec(name="a" * 60).check()


# ------------------------------------------------------------------------------------------------ API paths
def test_submit_creates_the_trainjob_then_its_params_configmap_owned_by_it(launcher, server):
    submitted = launcher.submit(make_spec(), PARAMS_TEXT)
    assert [c[:2] for c in server.calls] == [("POST", "create"), ("POST", "create")]
    assert [c[3] for c in server.calls] == ["trainjobs", "configmaps"]
    configmap = server.configmaps[("ml", "lc-run-params")]
    assert configmap["data"]["params.yaml"] == PARAMS_TEXT
    (owner,) = configmap["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("TrainJob", "lc-run", submitted.uid)
    assert configmap["metadata"]["labels"]["lightclip.dev/trainjob"] == "lc-run"


def test_wait_polls_until_complete(launcher, server, clock):
    launcher.submit(make_spec(), PARAMS_TEXT)
    server.statuses["lc-run"] = [
        {"jobsStatus": jobs_status(active=1)},
        {"jobsStatus": jobs_status(active=1, ready=1)},
        {"conditions": [condition("Complete", reason="AllJobsCompleted", message="jobset completed successfully")],
         "jobsStatus": jobs_status(succeeded=1)}]
    job = launcher.wait("lc-run", "ml", timeout_s=600)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert clock.sleeps == [5, 5]
    assert [c[1] for c in server.calls[2:]] == ["get", "get", "get"]


def test_failure_carries_reason_message_and_the_failed_node(launcher, server):
    launcher.submit(make_spec(), PARAMS_TEXT)
    server.add_failed_pod("lc-run", 1, 137, "OOMKilled")
    server.statuses["lc-run"] = [{"conditions": [condition(
        "Failed", reason="FailedJobs", message="jobset failed due to one or more job failures")],
        "jobsStatus": jobs_status(failed=1)}]
    with pytest.raises(TrainJobFailed) as info:
        launcher.wait("lc-run", "ml", timeout_s=600)
    err = info.value
    assert (err.reason, err.failed_jobs) == ("FailedJobs", ["node (1 failed)"])
    text = str(err)
    assert "\n" not in text and "FailedJobs" in text and "one or more job failures" in text
    assert "node 1 (pod lc-run-node-0-1: node exit 137 OOMKilled)" in text


def test_failure_without_child_job_status_still_reports_the_reason(launcher, server):
    launcher.submit(make_spec(), PARAMS_TEXT)
    server.statuses["lc-run"] = [{"conditions": [condition(
        "Failed", reason="DeadlineExceeded", message="TrainJob exceeded its activeDeadlineSeconds")]}]
    with pytest.raises(TrainJobFailed, match="DeadlineExceeded: TrainJob exceeded its activeDeadlineSeconds$"):
        launcher.wait("lc-run", "ml", timeout_s=600)


def test_timeout_raises_and_leaves_the_job_running(launcher, server, clock):
    launcher.submit(make_spec(), PARAMS_TEXT)
    server.statuses["lc-run"] = [{"jobsStatus": jobs_status(active=1, ready=1)}]
    with pytest.raises(TrainJobTimeout, match=r"not finished after 12 s .*kubectl delete trainjob lc-run -n ml"):
        launcher.wait("lc-run", "ml", timeout_s=12)
    assert sum(clock.sleeps) == pytest.approx(12) and ("ml", "lc-run") in server.trainjobs


def test_conflict_is_one_line_and_creates_nothing_more(launcher, server):
    launcher.submit(make_spec(), PARAMS_TEXT)
    server.calls.clear()
    with pytest.raises(AlreadyExists) as info:
        launcher.submit(make_spec(), PARAMS_TEXT)
    assert "\n" not in str(info.value) and "'lc-run' in namespace 'ml' already exists" in str(info.value)
    assert [c[3] for c in server.calls] == ["trainjobs"]


def test_a_failed_configmap_creation_takes_the_trainjob_back(launcher, server):
    server.fail[("create", "configmaps")] = _status_error(403, "Forbidden", 'configmaps is forbidden: User '
                                                          '"system:serviceaccount:ml:x" cannot create resource')
    with pytest.raises(LaunchError, match=r"HTTP 403: .*cannot create resource \(the service account lacks RBAC"):
        launcher.submit(make_spec(), PARAMS_TEXT)
    assert server.trainjobs == {} and server.calls[-1][1:] == ("delete", "trainer.kubeflow.org", "trainjobs")


def test_unreachable_api_is_one_line(launcher, server):
    server.unreachable = True
    with pytest.raises(ApiUnavailable) as info:
        launcher.submit(make_spec(), PARAMS_TEXT)
    assert "\n" not in str(info.value) and "Kubernetes API unreachable" in str(info.value)


def test_missing_trainer_crd_gives_a_hint(launcher, server):
    server.fail[("create", "trainjobs")] = _status_error(404, "NotFound", "the server could not find the requested "
                                                                         "resource")
    with pytest.raises(LaunchError, match="is Kubeflow Trainer installed"):
        launcher.submit(make_spec(), PARAMS_TEXT)


def test_cancel_deletes_the_trainjob_and_its_configmap(launcher, server):
    launcher.submit(make_spec(), PARAMS_TEXT)
    launcher.cancel("lc-run", "ml")
    assert server.trainjobs == {} and server.configmaps == {}
    launcher.submit(make_spec(), PARAMS_TEXT)
    del server.configmaps[("ml", "lc-run-params")]  # already garbage-collected: still fine
    launcher.cancel("lc-run", "ml")
    with pytest.raises(LaunchError, match="HTTP 404"):
        launcher.cancel("lc-run", "ml")


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_waits_and_prints_the_failed_nodes_log_then_one_error_line(tmp_path, server, capsys, monkeypatch):
    def scripted_submit(self, spec, params_text):
        submitted = original(self, spec, params_text)
        server.add_failed_pod("lc-run", 0, 1, "Error")
        server.logs["lc-run-node-0-0"] = "Traceback (most recent call last):\nRuntimeError: NCCL timeout\n"
        server.statuses["lc-run"] = [{"conditions": [condition("Failed", reason="FailedJobs", message="failed")],
                                      "jobsStatus": jobs_status(failed=1)}]
        return submitted

    original = TrainJobLauncher.submit
    monkeypatch.setattr(TrainJobLauncher, "submit", scripted_submit)
    code = command.run_trainjob(cli_args(tmp_path, "--wait", "--poll", "0"), k8s.CustomObjectsApi(server),
                                k8s.CoreV1Api(server))
    err = capsys.readouterr().err.rstrip("\n").splitlines()
    assert code == command.EXIT_FAILED
    assert "RuntimeError: NCCL timeout" in err
    assert err[-1].startswith("lightclip trainjob: error: trainjob 'lc-run' failed: FailedJobs")
    assert "node 0 (pod lc-run-node-0-0: node exit 1 Error)" in err[-1]


def test_cli_reports_success_as_json(tmp_path, server, capsys, monkeypatch):
    server.statuses["lc-run"] = [{"conditions": [condition("Complete", message="done")]}]
    code = command.run_trainjob(cli_args(tmp_path, "--wait", "--poll", "0", "--set", "train.lr=0.002"),
                                k8s.CustomObjectsApi(server), k8s.CoreV1Api(server))
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["conditions"] == {"Complete": "True"} and summary["procs_per_node"] == 8
    shipped = yaml.safe_load(server.configmaps[("ml", "lc-run-params")]["data"]["params.yaml"])
    assert shipped["train"]["lr"] == 0.002


def test_cli_unreachable_api_exits_1_with_one_line(tmp_path, server, capsys):
    server.unreachable = True
    code = command.run_trainjob(cli_args(tmp_path), k8s.CustomObjectsApi(server), k8s.CoreV1Api(server))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Kubernetes API unreachable" in err


def test_cli_dry_run_prints_manifests_checked_against_the_crd(tmp_path, server, capsys):
    crd = str(CRDS / "trainer.kubeflow.org_trainjobs.yaml")
    code = command.run_trainjob(cli_args(tmp_path, "--dry-run", "--crd", crd, "--toleration",
                                         "nvidia.com/gpu:NoSchedule", "--node-selector", "pool=gpu"),
                                k8s.CustomObjectsApi(server), k8s.CoreV1Api(server))
    configmap, trainjob = yaml.safe_load_all(capsys.readouterr().out)
    assert code == 0 and server.calls == []
    assert configmap["kind"] == "ConfigMap" and trainjob["kind"] == "TrainJob"
    pod = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"pool": "gpu"}


# ------------------------------------------------------------------------------------------------ RBAC contract
def test_api_calls_list_is_exactly_what_the_launcher_sends(tmp_path, server, launcher, capsys, monkeypatch):
    """Every request of every path (submit, wait, failure diagnosis and log, rollback, cancel) maps to an entry of
    API_CALLS, and every entry is used: the Role in infra/k8s is derived from that list."""
    launcher.submit(make_spec(), PARAMS_TEXT)
    server.statuses["lc-run"] = [{"conditions": [condition("Failed", reason="FailedJobs", message="failed")],
                                  "jobsStatus": jobs_status(failed=1)}]
    pod = server.add_failed_pod("lc-run", 0, 1, "Error")
    server.logs[pod] = "boom\n"
    with pytest.raises(TrainJobFailed) as info:
        launcher.wait("lc-run", "ml")
    command._print_failed_log(launcher, info.value)
    launcher.cancel("lc-run", "ml")
    sent: dict[tuple[str, str], set[str]] = {}
    for _, verb, group, resource in server.calls:
        sent.setdefault((group, resource), set()).add(verb)
    assert sent == required_permissions()
