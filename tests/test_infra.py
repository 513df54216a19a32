"""infra/: every kustomization renders and every object is valid (built-in kinds: kubernetes-validate, strict; Trainer
kinds: the vendored CRD schemas), the images pin what pyproject.toml pins and run as a numeric non-root user, and the
manifests agree with the launcher (RBAC = its API calls, runtime and ConfigMap names, pod labels the NetworkPolicy
admits). Hardening: every pod meets the Pod Security Standard "restricted" with a read-only root file system and CPU
and memory requests and limits, the namespace enforces that standard, MLflow admits only the pipeline's pods and
only with a login (checked against a real `mlflow server` started with the manifest's arguments), and no manifest
holds a secret value."""
from __future__ import annotations

import configparser
import contextlib
import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from lightclip_core.launch import manifests as launcher
from lightclip_core.launch.crd_schema import CustomResourceValidator, cel_predicate, cel_rules_in, load_crd

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S_VERSION = "1.32.0"  # kubectl on the development machines and in CI is v1.32
KUSTOMIZATIONS = sorted(p.parent.relative_to(INFRA / "k8s").as_posix()
                        for p in (INFRA / "k8s").rglob("kustomization.yaml"))
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (needed to "
                                                                           "render the kustomizations)")


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, CustomResourceValidator]:
    validators = [CustomResourceValidator(load_crd(p)) for p in sorted((INFRA / "crds").glob("*.yaml"))]
    return {v.kind: v for v in validators}


_RENDERED: dict[str, list[dict]] = {}


def render(name: str) -> list[dict]:
    if name not in _RENDERED:
        done = subprocess.run(["kubectl", "kustomize", str(INFRA / "k8s" / name)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        _RENDERED[name] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return _RENDERED[name]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------------ rendering
def test_the_kustomizations_are_the_expected_ones():
    assert KUSTOMIZATIONS == ["base", "cluster-runtime", "overlays/example", "runtime"]


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates_strictly(name, crd_validators):
    objects = render(name)
    assert objects
    for obj in objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if group == "trainer.kubeflow.org":
            assert crd_validators[obj["kind"]].errors(obj) == [], obj["metadata"]["name"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@needs_kubectl
def test_strict_validation_rejects_a_misspelt_field():
    deployment = copy.deepcopy(find(render("base"), "Deployment", "lightclip-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@needs_kubectl
def test_overlay_sets_the_namespace_and_commits_no_secret():
    objects = render("overlays/example")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"lightclip"}
    for name in KUSTOMIZATIONS:
        assert not [o for o in render(name) if o["kind"] == "Secret"]
        assert not [o for o in render(name) if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize("crd", ["trainingruntimes", "clustertrainingruntimes"])
def test_every_cel_rule_of_the_runtime_crds_is_evaluated(crd_validators, crd):
    kind = {"trainingruntimes": "TrainingRuntime", "clustertrainingruntimes": "ClusterTrainingRuntime"}[crd]
    rules = set(cel_rules_in(crd_validators[kind].openapi_schema))
    assert rules and [r for r in rules if cel_predicate(r) is None] == []


@needs_kubectl
def test_runtime_schema_check_catches_a_mistake(crd_validators):
    runtime = copy.deepcopy(find(render("runtime"), "TrainingRuntime"))
    runtime["spec"]["mlPolicy"]["mpi"] = {}  # two ML policies at once
    runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["replica"] = 2
    errors = " | ".join(crd_validators["TrainingRuntime"].errors(runtime))
    assert "Only one of the policy can be configured" in errors and "'replica' was unexpected" in errors


# ------------------------------------------------------------------------------------------------ agreement
@needs_kubectl
def test_role_grants_exactly_the_launchers_api_calls():
    role = find(render("base"), "Role", "lightclip-trainjob-launcher")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == launcher.required_permissions()
    binding = find(render("overlays/example"), "RoleBinding", "lightclip-trainjob-launcher")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lightclip-pipeline", "namespace": "lightclip"}]


@needs_kubectl
@pytest.mark.parametrize("name,kind", [("runtime", "TrainingRuntime"), ("cluster-runtime", "ClusterTrainingRuntime")])
def test_runtime_matches_what_the_launcher_references(name, kind):
    runtime = find(render(name), kind, launcher.DEFAULT_RUNTIME)
    assert kind in launcher.RUNTIME_KINDS
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in runtime["spec"]["mlPolicy"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == launcher.NODE_JOB
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = job["template"]["spec"]["template"]
    assert pod["metadata"]["labels"][launcher.MLFLOW_CLIENT_LABEL] == "true"
    (container,) = pod["spec"]["containers"]
    assert container["name"] == launcher.NODE_JOB
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[launcher.SHM_DIR] == "dshm"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {e["name"] for e in container["env"]} >= {"NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    assert not {e["name"] for e in container["env"]} & {"PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR"}


@needs_kubectl
def test_pipeline_configmap_provides_the_launchers_environment():
    data = find(render("base"), "ConfigMap", launcher.DEFAULT_MLFLOW_CONFIGMAP)["data"]
    assert set(launcher.MLFLOW_CONFIGMAP_KEYS) <= set(data)
    assert data["MLFLOW_TRACKING_URI"] == "http://lightclip-mlflow:5000"
    service = find(render("base"), "Service", "lightclip-mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000


@needs_kubectl
def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts_with_health_probes():
    objects = render("overlays/example")
    pod = find(objects, "Deployment", "lightclip-mlflow")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--serve-artifacts" in c["args"] and "--artifacts-destination=$(ARTIFACTS_DESTINATION)" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://$(POSTGRES_USER):"
                                                                "$(POSTGRES_PASSWORD)@lightclip-postgres:5432/")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "lightclip-postgres"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    server_cm = find(objects, "ConfigMap", "lightclip-mlflow-server")["data"]
    assert server_cm["ARTIFACTS_DESTINATION"].startswith("s3://") and server_cm["MLFLOW_S3_ENDPOINT_URL"]
    postgres = find(objects, "StatefulSet", "lightclip-postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert all(pod_security(o)["runAsNonRoot"] for o in (find(objects, "Deployment"), postgres))


def pod_security(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["securityContext"]


def trainjob_pod(**fields) -> dict:
    """The pod template the launcher patches into every TrainJob's nodes."""
    body = launcher.build_trainjob(launcher.TrainJobSpec(**{"name": "x", "image": "i", "data": "d", "out": "o",
                                                            **fields}))
    return body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]


@needs_kubectl
def test_network_policies_admit_only_the_pipeline_trainer_pods_and_mlflow():
    objects = render("overlays/example")
    mlflow = find(objects, "NetworkPolicy", "lightclip-mlflow")
    server_labels = find(objects, "Deployment", "lightclip-mlflow")["spec"]["template"]["metadata"]["labels"]
    assert mlflow["spec"]["podSelector"]["matchLabels"].items() <= server_labels.items()
    (rule,) = mlflow["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    # pods of this namespace with the pipeline's label, nothing else: no namespaceSelector (the kubeflow namespace
    # with its ingress gateway), no ipBlock, no selector every KFP task pod of any pipeline matches
    assert rule["from"] == [{"podSelector": {"matchLabels": {launcher.MLFLOW_CLIENT_LABEL: "true"}}}]
    for labels in (trainjob_pod()["metadata"]["labels"], runtime_pod(objects)["metadata"]["labels"]):
        assert labels[launcher.MLFLOW_CLIENT_LABEL] == "true"  # the Kubeflow tasks: tests/test_kfp_structure.py
    postgres = find(objects, "NetworkPolicy", "lightclip-postgres")
    (rule,) = postgres["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "lightclip-mlflow"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


@needs_kubectl
def test_every_referenced_secret_has_its_create_command_in_the_readme():
    readme = (INFRA / "README.md").read_text()
    referenced: dict[str, set[str]] = {}

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                referenced.setdefault(ref["name"], set()).add(ref["key"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(render("base"))
    walk(launcher.build_trainjob(launcher.TrainJobSpec(name="x", image="i", data="d", out="o")))
    assert set(referenced) == {"lightclip-postgres", "lightclip-s3", "lightclip-mlflow-auth", "lightclip-mlflow-admin"}
    for secret, keys in referenced.items():
        command = re.search(rf"kubectl (?:-n \S+ )?create secret generic {secret}\b[^\n]*(?:\\\n[^\n]*)*", readme)
        assert command, f"no `kubectl create secret generic {secret}` in infra/README.md"
        assert all(f"--from-literal={key}=" in command.group(0) for key in keys), (secret, keys)


# ------------------------------------------------------------------------------------------------ images
def pinned(requirements: list[str], package: str) -> str:
    (spec,) = [r for r in requirements if re.match(rf"{package}\s*==", r)]
    return spec.split("==")[1].strip()


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_project_images_pin_torch_as_pyproject_and_run_as_non_root(variant):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    text = (INFRA / "docker" / f"{variant}.Dockerfile").read_text()
    for package in ("torch", "torchvision"):
        assert re.findall(rf"\b{package}==([\w.+]+)", text) == [pinned(deps, package)], package
    assert runs_as_the_manifests_user(text)
    assert re.search(r"DVC_NO_ANALYTICS=1", text) and re.search(r"MLFLOW_DISABLE_TELEMETRY=true", text)
    assert re.search(r"pip install \.", text) and 'ENTRYPOINT ["lightclip"]' in text
    if variant == "cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
    else:
        assert re.search(r"^FROM nvidia/cuda:\S+", text, flags=re.M)


def test_mlflow_image_has_the_postgres_s3_and_auth_clients_and_runs_as_non_root():
    text = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    for package in (r"mlflow\[auth\]", "psycopg2-binary", "boto3"):  # `auth`: Flask-WTF, for the basic-auth app
        assert re.search(rf"\b{package}==[\d.]+", text), package
    assert runs_as_the_manifests_user(text)


def runs_as_the_manifests_user(dockerfile: str) -> bool:
    """The image creates a user with the numeric uid the manifests run as and switches to it by number (the kubelet
    can check `runAsNonRoot` only against a numeric USER)."""
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    uid = str(launcher.RUN_AS_USER)
    return bool(users) and users[-1] == f"{uid}:{uid}" and f"useradd --create-home --uid {uid} " in dockerfile


@needs_kubectl
def test_manifests_use_the_images_the_dockerfiles_document():
    documented = set(re.findall(r"-t (\S+?):\S+ ", "\n".join(p.read_text() for p in (INFRA / "docker").iterdir())))
    used = {c["image"].rsplit(":", 1)[0] for o in render("overlays/example")
            for c in _containers(o) if "lightclip" in c["image"]}
    assert used and used <= documented


def _containers(obj: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            for c in node.get("containers", []) if isinstance(node.get("containers"), list) else []:
                found.append(c)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return found


# ------------------------------------------------------------------------------------------------ hardening
# The Pod Security Standard "restricted" of Kubernetes 1.32 (https://kubernetes.io/docs/concepts/security/
# pod-security-standards/): the baseline rules and restricted's own, as the admission controller checks a pod.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every object that makes pods."""
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(where, obj["spec"]["template"])]
    if obj["kind"] in launcher.RUNTIME_KINDS:
        return [(f"{where}/{job['name']}", job["template"]["spec"]["template"])
                for job in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return [(where, obj)] if obj["kind"] == "Pod" else []


def runtime_pod(objects: list[dict]) -> dict:
    (pod,) = [p for o in objects if o["kind"] in launcher.RUNTIME_KINDS for _, p in pod_templates(o)]
    return pod


def restricted_violations(pod: dict) -> list[str]:
    """Every rule of the restricted standard that the pod template breaks, one line each."""
    spec, found = pod["spec"], []
    pod_sc = spec.get("securityContext", {})
    found += [f"{field}: true" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]
    for volume in spec.get("volumes", []):
        if set(volume) - {"name"} - RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: type {sorted(set(volume) - {'name'})} not allowed")
    found += [f"sysctl {s['name']}: not a safe sysctl" for s in pod_sc.get("sysctls", []) if s["name"] not in
              SAFE_SYSCTLS]
    if pod_sc.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    if pod_sc.get("seccompProfile", {}).get("type") == "Unconfined":
        found.append("pod: seccompProfile Unconfined")
    for c in [c for key in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(key, [])]:
        sc, where = c.get("securityContext", {}), f"container {c['name']}"

        def effective(field, default=None, sc=sc):
            return sc.get(field, pod_sc.get(field, default))

        capabilities = sc.get("capabilities", {})
        checks = {
            "privileged": not sc.get("privileged", False),
            "allowPrivilegeEscalation must be false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities must drop ALL": "ALL" in capabilities.get("drop", []),
            "capabilities may add only NET_BIND_SERVICE": set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"},
            "runAsNonRoot must be true": effective("runAsNonRoot") is True,
            "runAsUser 0": effective("runAsUser") != 0,
            "seccompProfile must be RuntimeDefault or Localhost":
                effective("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"),
            "hostPort": not any(port.get("hostPort") for port in c.get("ports", [])),
            "procMount must be Default": sc.get("procMount", "Default") == "Default",
            "appArmorProfile Unconfined": effective("appArmorProfile", {}).get("type") != "Unconfined",
            "seLinuxOptions: custom user, role or type": not ({"user", "role"} & set(effective("seLinuxOptions", {})))
                and effective("seLinuxOptions", {}).get("type") in SELINUX_TYPES,
        }
        found += [f"{where}: {rule}" for rule, ok in checks.items() if not ok]
    return found


def hardening_gaps(pod: dict, with_resources: bool = True) -> list[str]:
    """What the project asks beyond the standard: a read-only root file system with a writable /tmp on an emptyDir,
    and (`with_resources`) CPU and memory requests and limits on every container."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    found = []
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        where = f"container {c['name']}"
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: readOnlyRootFilesystem must be true")
        tmp = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}.get("/tmp")
        if "emptyDir" not in volumes.get(tmp, {}):
            found.append(f"{where}: no emptyDir at /tmp")
        if with_resources:
            found += [f"{where}: no {resource} {kind[:-1]}" for kind in ("requests", "limits")
                      for resource in ("cpu", "memory") if resource not in c.get("resources", {}).get(kind, {})]
    return found


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_pod_meets_the_restricted_standard_with_a_read_only_root(name):
    pods = [(where, o["kind"], pod) for o in render(name) for where, pod in pod_templates(o)]
    assert pods
    for where, kind, pod in pods:
        assert restricted_violations(pod) == [], where
        # a Trainer runtime's resources are the TrainJob's (resourcesPerNode): test_trainjob_pods_meet_...
        assert hardening_gaps(pod, with_resources=kind not in launcher.RUNTIME_KINDS) == [], where


@needs_kubectl
def test_trainjob_pods_meet_the_restricted_standard_on_any_runtime():
    """The launcher patches the same security settings into every TrainJob, so a job on a runtime made elsewhere is
    held to them too; the runtime in infra/ carries them itself."""
    pod = trainjob_pod(nodes=2, gpus_per_node=4, workspace_pvc="claim")
    assert restricted_violations(pod) == [] and hardening_gaps(pod, with_resources=False) == []
    (container,) = pod["spec"]["containers"]
    assert {"name": "HOME", "value": launcher.TMP_DIR} in container["env"]  # caches land on the writable /tmp
    resources = launcher.build_trainjob(launcher.TrainJobSpec(name="x", image="i", data="d", out="o"))["spec"][
        "trainer"]["resourcesPerNode"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    runtime = runtime_pod(render("runtime"))
    assert runtime["spec"]["securityContext"] == launcher.POD_SECURITY_CONTEXT
    (node,) = runtime["spec"]["containers"]
    assert node["securityContext"] == launcher.CONTAINER_SECURITY_CONTEXT
    assert {"name": "HOME", "value": launcher.TMP_DIR} in node["env"]


def _drop_run_as_non_root(pod: dict) -> None:
    pod["spec"]["securityContext"].pop("runAsNonRoot")
    pod["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot")


@needs_kubectl
@pytest.mark.parametrize("rule, breach", [
    ("hostNetwork", lambda pod: pod["spec"].update(hostNetwork=True)),
    ("type ['hostPath']", lambda pod: pod["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
    ("privileged", lambda pod: pod["spec"]["containers"][0]["securityContext"].update(privileged=True)),
    ("allowPrivilegeEscalation", lambda pod: pod["spec"]["containers"][0]["securityContext"].pop(
        "allowPrivilegeEscalation")),
    ("drop ALL", lambda pod: pod["spec"]["containers"][0]["securityContext"].update(capabilities={"drop": []})),
    ("NET_BIND_SERVICE", lambda pod: pod["spec"]["containers"][0]["securityContext"].update(
        capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]})),
    ("runAsNonRoot", _drop_run_as_non_root),
    ("runAsUser 0", lambda pod: pod["spec"]["containers"][0]["securityContext"].update(runAsUser=0)),
    ("seccompProfile", lambda pod: pod["spec"]["securityContext"].pop("seccompProfile")),
    ("hostPort", lambda pod: pod["spec"]["containers"][0]["ports"][0].update(hostPort=5000)),
    ("sysctl", lambda pod: pod["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
])
def test_the_restricted_check_catches_each_rule(rule, breach):
    pod = copy.deepcopy(find(render("base"), "Deployment", "lightclip-mlflow")["spec"]["template"])
    assert restricted_violations(pod) == []
    breach(pod)
    assert any(rule in line for line in restricted_violations(pod)), restricted_violations(pod)


@needs_kubectl
def test_the_hardening_check_catches_a_writable_root_and_a_missing_limit():
    pod = copy.deepcopy(find(render("base"), "StatefulSet", "lightclip-postgres")["spec"]["template"])
    assert hardening_gaps(pod) == []
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    del pod["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert hardening_gaps(pod) == ["container postgres: readOnlyRootFilesystem must be true",
                                   "container postgres: no cpu limit"]


@needs_kubectl
def test_the_namespace_enforces_the_restricted_standard():
    labels = find(render("overlays/example"), "Namespace", "lightclip")["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode
        assert re.fullmatch(r"v1\.\d+", labels[f"pod-security.kubernetes.io/{mode}-version"]), mode
    assert "pod-security.kubernetes.io/enforce" in (REPO / "docs" / "KUBEFLOW.md").read_text()  # its exceptions


# ------------------------------------------------------------------------------------------------ secrets
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)
URI_LOGIN = re.compile(r"://([^/\s@]+)@")  # user[:password]@ in a URI
SETTING = re.compile(r"^\s*([\w.-]+)\s*[=:]\s*(\S.*)$", re.MULTILINE)  # `key = value` / `key: value` lines


def literal_secrets(node, path: str = "") -> list[str]:
    """Where a manifest holds a secret value itself: an env variable with a secret's name and a literal value, a URI
    with a literal login, or a ConfigMap entry (or a `key = value` line inside one) with a secret's name."""
    found: list[str] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, f"{path}[{i}]")
        return found
    if not isinstance(node, dict):
        if isinstance(node, str):
            for login in URI_LOGIN.findall(node):
                if re.sub(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", "", login).strip(":"):  # only $(VAR) references pass
                    found.append(f"{path}: a literal login in a URI")
        return found
    if node.get("kind") == "ConfigMap":
        for key, text in node.get("data", {}).items():
            names = [key] + [name for name, _ in SETTING.findall(text)]
            found += [f"{path}/data/{key}: {name}" for name in names if SECRET_NAME.search(name)]
    if isinstance(node.get("name"), str) and "value" in node and SECRET_NAME.search(node["name"]):
        found.append(f"{path}: env {node['name']} has a literal value")
    for key, value in node.items():
        found += literal_secrets(value, f"{path}/{key}")
    return found


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_manifest_holds_a_secret_value(name):
    assert literal_secrets(render(name)) == []


def test_no_trainjob_holds_a_secret_value():
    spec = launcher.TrainJobSpec(name="x", image="i", data="d", out="o", nodes=2)
    assert literal_secrets([launcher.build_trainjob(spec), launcher.build_params_configmap(spec, "train: {}\n")]) == []


@needs_kubectl
def test_the_secret_check_catches_literal_values():
    objects = copy.deepcopy(render("base"))
    container = find(objects, "Deployment", "lightclip-mlflow")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "hunter2hunter2"})
    container["env"].append({"name": "URI", "value": "postgresql://mlflow:hunter2@db:5432/mlflow"})
    config = find(objects, "ConfigMap", "lightclip-mlflow-auth-config")["data"]
    config["basic_auth.ini"] += "admin_password = hunter2hunter2\n"
    assert len(literal_secrets(objects)) == 3


# ------------------------------------------------------------------------------------------------ MLflow login
def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict) -> tuple[str, str, bool]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"], ref.get("optional", False)


@needs_kubectl
def test_mlflow_requires_a_login_and_every_client_has_one_from_a_secret():
    objects = render("overlays/example")
    pod = find(objects, "Deployment", "lightclip-mlflow")["spec"]["template"]
    (server,) = pod["spec"]["containers"]
    assert "--app-name=basic-auth" in server["args"]
    env = env_of(server)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert secret_ref(env[name]) == ("lightclip-mlflow-admin", name, False), name
    assert secret_ref(env["PGUSER"])[:2] == ("lightclip-postgres", "POSTGRES_USER")
    assert secret_ref(env["PGPASSWORD"])[:2] == ("lightclip-postgres", "POSTGRES_PASSWORD")
    # the basic-auth config: mounted from its ConfigMap where MLFLOW_AUTH_CONFIG_PATH points, no login in it
    config_path = Path(find(objects, "ConfigMap", "lightclip-mlflow-server")["data"]["MLFLOW_AUTH_CONFIG_PATH"])
    mount = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}[str(config_path.parent)]
    config_map = {v["name"]: v for v in pod["spec"]["volumes"]}[mount]["configMap"]["name"]
    ini = configparser.ConfigParser()
    ini.read_string(find(objects, "ConfigMap", config_map)["data"][config_path.name])
    assert ini["mlflow"]["database_uri"].startswith("postgresql+psycopg2://lightclip-postgres:5432/")
    assert not {"admin_username", "admin_password"} & set(ini["mlflow"])
    # the clients: trainer pods (the Kubeflow tasks: tests/test_kfp_structure.py)
    trainer_env = env_of(launcher.build_trainjob(launcher.TrainJobSpec(name="x", image="i", data="d", out="o"))[
        "spec"]["trainer"])
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert secret_ref(trainer_env[name]) == ("lightclip-mlflow-auth", name, False), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def manifest_mlflow_server(root: Path, admin: tuple[str, str]):
    """`mlflow server` with the Deployment's arguments and the basic-auth ConfigMap, on 127.0.0.1, the stores in one
    SQLite file (as the manifest shares one PostgreSQL database), artifacts in `root`, HOME and the working
    directory read-only (as the container's root file system), /tmp writable."""
    objects = render("base")
    (container,) = find(objects, "Deployment", "lightclip-mlflow")["spec"]["template"]["spec"]["containers"]
    server_env = find(objects, "ConfigMap", "lightclip-mlflow-server")["data"]
    port, db = _free_port(), f"sqlite:///{root / 'mlflow.db'}"
    local = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
             "--artifacts-destination": str(root / "artifacts")}
    args = [a if a.split("=")[0] not in local else f"{a.split('=')[0]}={local[a.split('=')[0]]}"
            for a in container["args"]]
    ini = configparser.ConfigParser()
    ini.read_string(find(objects, "ConfigMap", "lightclip-mlflow-auth-config")["data"]["basic_auth.ini"])
    ini["mlflow"]["database_uri"] = db
    with open(root / "basic_auth.ini", "w") as f:
        ini.write(f)
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o555)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
           "MLFLOW_SERVER_ALLOWED_HOSTS": f"{server_env['MLFLOW_SERVER_ALLOWED_HOSTS']},127.0.0.1:{port}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_BACKEND_STORE_URI": db, "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key", "HOME": str(root / "readonly"),
           "TMPDIR": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=root / "readonly", start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.25)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


@needs_kubectl
@pytest.mark.timeout(300)
def test_the_manifests_mlflow_server_refuses_anonymous_clients_and_the_readme_makes_the_pipeline_user(
        tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow's `auth` extra (Flask-WTF)")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    admin, pipeline = ("boss", "admin-password-0123"), ("lightclip-pipeline", "pipeline-password-0123")
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    with manifest_mlflow_server(tmp_path, admin) as uri:
        assert requests.get(f"{uri}/health", timeout=10).status_code == 200  # the probes need no login
        assert requests.get(uri + search, timeout=10).status_code == 401
        assert requests.get(uri + search, auth=(admin[0], "wrong-password-0123"), timeout=10).status_code == 401
        assert requests.get(uri + search, auth=admin, timeout=10).status_code == 200
        # infra/README.md's one-time command, run as written (the port-forward's address replaced by this server's)
        (command,) = re.findall(r"^MLFLOW_TRACKING_USERNAME=.*get_app_client\('basic-auth'.*$",
                                (INFRA / "README.md").read_text(), flags=re.M)
        done = subprocess.run(["bash", "-c", command.replace("http://localhost:5000", uri)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "MLFLOW_ADMIN": admin[0],
                                                           # the command's `python` is this environment's, as in
                                                           # the MLflow image, also where the venv is not activated
                                                           "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                                                   f"{os.environ.get('PATH', '')}",
                                                           "MLFLOW_ADMIN_PASSWORD": admin[1],
                                                           "MLFLOW_USER": pipeline[0],
                                                           "MLFLOW_PASSWORD": pipeline[1]})
        assert done.returncode == 0, done.stderr[-2000:]
        # the pipeline's login (what lightclip-mlflow-auth holds) can track and register, not administer
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", pipeline[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pipeline[1])
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("lightclip"))
        client.log_metric(run.info.run_id, "loss", 0.5)
        client.create_registered_model("lightclip")
        assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
        from mlflow.server import get_app_client

        with pytest.raises(MlflowException):
            get_app_client("basic-auth", tracking_uri=uri).create_user("intruder", "intruder-password-0123")
