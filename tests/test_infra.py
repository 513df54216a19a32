"""infra/: every kustomization renders and every object is valid (built-in kinds: kubernetes-validate, strict; Trainer
kinds: the vendored CRD schemas), the images pin what pyproject.toml pins and run as non-root, and the manifests agree
with the launcher (RBAC = its API calls, runtime and ConfigMap names, pod labels the NetworkPolicy admits)."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
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


@needs_kubectl
def test_network_policies_admit_only_the_pipeline_trainer_pods_and_mlflow():
    objects = render("base")
    mlflow = find(objects, "NetworkPolicy", "lightclip-mlflow")
    sources = mlflow["spec"]["ingress"][0]["from"]
    labels = [s["podSelector"]["matchLabels"] for s in sources if "podSelector" in s]
    assert {launcher.MLFLOW_CLIENT_LABEL: "true"} in labels
    trainer_pod_labels = launcher.build_trainjob(launcher.TrainJobSpec(
        name="x", image="i", data="d", out="o"))["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"][
        "spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"]
    assert any(all(trainer_pod_labels.get(k) == v for k, v in sel.items()) for sel in labels)
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
    assert set(referenced) == {"lightclip-postgres", "lightclip-s3", "lightclip-mlflow-auth"}
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
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"DVC_NO_ANALYTICS=1", text) and re.search(r"MLFLOW_DISABLE_TELEMETRY=true", text)
    assert re.search(r"pip install \.", text) and 'ENTRYPOINT ["lightclip"]' in text
    if variant == "cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
    else:
        assert re.search(r"^FROM nvidia/cuda:\S+", text, flags=re.M)


def test_mlflow_image_has_the_postgres_and_s3_clients_and_runs_as_non_root():
    text = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    for package in ("mlflow", "psycopg2-binary", "boto3"):
        assert re.search(rf"\b{package}==[\d.]+", text), package
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


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
