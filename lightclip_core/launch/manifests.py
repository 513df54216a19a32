"""A Kubeflow Trainer v2 `TrainJob` as data: its names and constants, the validated spec of one job, and the
TrainJob and params ConfigMap manifests built from it (no cluster needed; lightclip_core.launch.trainjob submits
them)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lightclip_core.config import Config, ConfigError, load_config
from lightclip_core.resources_config import cpu_cores, memory_bytes

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "trainjobs"
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")

DEFAULT_RUNTIME = "lightclip-torch"
DEFAULT_MLFLOW_CONFIGMAP = "lightclip-mlflow"
DEFAULT_S3_SECRET = "lightclip-s3"
DEFAULT_MLFLOW_AUTH_SECRET = "lightclip-mlflow-auth"
PATCH_MANAGER = "lightclip.dev/launcher"
NODE_JOB = "node"  # the runtime's replicated job and container that the Trainer's torch policy drives
PARAMS_DIR = "/etc/lightclip"
PARAMS_FILE = "params.yaml"
SHM_DIR = "/dev/shm"
TMP_DIR = "/tmp"  # the only writable place besides the mounts: the root file system is read-only
WORKSPACE_DIR = "/workspace"
JOB_LABEL = "lightclip.dev/trainjob"
MLFLOW_CLIENT_LABEL = "lightclip.dev/mlflow-client"  # the NetworkPolicy in infra/k8s admits pods with it
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet labels every pod with its JobSet (= TrainJob) name
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

# The Pod Security Standard "restricted" (plus a read-only root file system) for the trainer pods: the project images
# run as uid/gid 1000 (infra/docker). The runtime in infra/k8s/runtime carries the same; the TrainJob patches them in
# too, so a job on another runtime is held to them as well (tests/test_infra.py checks both against the standard).
RUN_AS_USER = 1000
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                                        "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                              "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                                              "seccompProfile": {"type": "RuntimeDefault"}}

# Environment of the trainer pods, by reference (the names the pipeline's components use too):
# variable -> optional? Each variable is read from the key of the same name.
MLFLOW_CONFIGMAP_KEYS: dict[str, bool] = {
    "MLFLOW_TRACKING_URI": False,
    "MLFLOW_EXPERIMENT_NAME": True,
    "MLFLOW_S3_ENDPOINT_URL": True,
    "AWS_ENDPOINT_URL": True,
    "AWS_DEFAULT_REGION": True,
}
S3_SECRET_KEYS: dict[str, bool] = {  # optional: a cluster may give S3 access through workload identity instead
    "AWS_ACCESS_KEY_ID": True,
    "AWS_SECRET_ACCESS_KEY": True,
}
MLFLOW_AUTH_SECRET_KEYS: dict[str, bool] = {  # required: the tracking server in infra/k8s authenticates every client
    "MLFLOW_TRACKING_USERNAME": False,
    "MLFLOW_TRACKING_PASSWORD": False,
}


class ApiCall(NamedTuple):
    """One Kubernetes call the launcher makes: the client method and the RBAC rule it needs."""

    method: str
    api_group: str
    resource: str
    verb: str


API_CALLS: tuple[ApiCall, ...] = (
    ApiCall("create_namespaced_custom_object", GROUP, PLURAL, "create"),
    ApiCall("get_namespaced_custom_object", GROUP, PLURAL, "get"),
    ApiCall("delete_namespaced_custom_object", GROUP, PLURAL, "delete"),
    ApiCall("create_namespaced_config_map", "", "configmaps", "create"),
    ApiCall("delete_namespaced_config_map", "", "configmaps", "delete"),
    ApiCall("list_namespaced_pod", "", "pods", "list"),
    ApiCall("read_namespaced_pod_log", "", "pods/log", "get"),
)


def required_permissions() -> dict[tuple[str, str], set[str]]:
    """(api group, resource) -> verbs, from API_CALLS: what the pipeline runner's Role must grant."""
    needed: dict[tuple[str, str], set[str]] = {}
    for call in API_CALLS:
        needed.setdefault((call.api_group, call.resource), set()).add(call.verb)
    return needed


# ------------------------------------------------------------------------------------------------ errors
class LaunchConfigError(ConfigError):
    """A launcher argument is invalid (one line naming the field); nothing was created."""


class LaunchError(RuntimeError):
    """A Kubernetes call or the TrainJob failed. The message is one line."""


class ApiUnavailable(LaunchError):
    """The API server cannot be reached or no Kubernetes configuration was found."""


class AlreadyExists(LaunchError):
    """An object of that name already exists (HTTP 409)."""


class TrainJobTimeout(LaunchError):
    """The TrainJob did not finish within the timeout (it keeps running)."""


class TrainJobFailed(LaunchError):
    """The TrainJob reported Failed; carries the reason, message and what failed."""

    def __init__(self, name: str, namespace: str, reason: str, message: str, failed_jobs: list[str],
                 failed_nodes: list[str]):
        self.name, self.namespace, self.reason, self.message = name, namespace, reason, message
        self.failed_jobs, self.failed_nodes = failed_jobs, failed_nodes
        where = "".join([f"; failed replicated jobs: {', '.join(failed_jobs)}" if failed_jobs else "",
                         f"; failed nodes: {', '.join(failed_nodes)}" if failed_nodes else ""])
        super().__init__(f"trainjob {name!r} failed: {reason}: {' '.join(message.split())}{where}")


# ------------------------------------------------------------------------------------------------ the spec
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class TrainJobSpec:
    """What one multi-node training run needs; `check()` names the first bad field."""

    name: str
    image: str
    data: str
    out: str
    nodes: int = 1
    gpus_per_node: int = 1
    procs_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU nodes
    namespace: str = "default"
    runtime: str = DEFAULT_RUNTIME
    runtime_kind: str = "TrainingRuntime"
    cpu: str | None = "8"
    memory: str | None = "32Gi"
    gpu_resource: str = "nvidia.com/gpu"
    shm_size: str | None = "16Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    mlflow_configmap: str = DEFAULT_MLFLOW_CONFIGMAP
    s3_secret: str = DEFAULT_S3_SECRET
    mlflow_auth_secret: str = DEFAULT_MLFLOW_AUTH_SECRET
    workspace_pvc: str | None = None  # a ReadWriteMany claim mounted at /workspace on every node (data, outputs)
    service_account: str | None = None
    active_deadline_s: int | None = None

    @property
    def params_configmap(self) -> str:
        return f"{self.name}-params"

    @property
    def nproc(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        def bad(fieldname: str, why: str) -> LaunchConfigError:
            return LaunchConfigError(f"{fieldname}={getattr(self, fieldname)!r}: {why}")

        # JobSet names pods `<name>-node-<job index>-<pod index>`; a pod's hostname is a 63-character DNS label
        longest = 63 - len(f"-{NODE_JOB}-0-") - len(str(max(self.nodes, 1) - 1))
        if not _DNS_LABEL.match(self.name or "") or len(self.name) > longest:
            raise bad("name", f"must be a DNS label (lower-case letters, digits, '-') of at most {longest} "
                              f"characters, so that pod names stay valid")
        if not _DNS_LABEL.match(self.namespace or ""):
            raise bad("namespace", "must be a DNS label")
        if not self.image or self.image != self.image.strip() or " " in self.image:
            raise bad("image", "a container image reference is required (e.g. registry/lightclip:cuda-0.1.0)")
        for name in ("data", "out"):
            if not getattr(self, name):
                raise bad(name, "a path or URI the trainer pods can reach is required")
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise bad("nodes", "must be an integer >= 1")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise bad("gpus_per_node", "must be an integer >= 0 (0: CPU nodes)")
        if self.procs_per_node is not None and (not isinstance(self.procs_per_node, int) or self.procs_per_node < 1):
            raise bad("procs_per_node", "must be an integer >= 1")
        if self.gpus_per_node and self.procs_per_node and self.procs_per_node != self.gpus_per_node:
            raise bad("procs_per_node", f"must equal gpus_per_node={self.gpus_per_node} (one process per GPU)")
        if self.runtime_kind not in RUNTIME_KINDS:
            raise bad("runtime_kind", f"must be one of {', '.join(RUNTIME_KINDS)}")
        for name in ("runtime", "mlflow_configmap", "s3_secret", "mlflow_auth_secret"):
            if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", getattr(self, name) or ""):
                raise bad(name, "must be a Kubernetes object name")
        for name, parse in (("cpu", cpu_cores), ("memory", memory_bytes), ("shm_size", memory_bytes)):
            try:
                if getattr(self, name) is not None:
                    parse(str(getattr(self, name)))
            except ValueError as err:
                raise bad(name, f"must be a Kubernetes quantity: {err}") from None
        if not _RESOURCE_NAME.match(self.gpu_resource or ""):
            raise bad("gpu_resource", "must be an extended resource name such as nvidia.com/gpu")
        for key, value in self.node_selector.items():
            if not _RESOURCE_NAME.match(key) or not isinstance(value, str):
                raise LaunchConfigError(f"node_selector[{key!r}]={value!r}: expected a label key and a string")
        for i, tol in enumerate(self.tolerations):
            if tol.get("effect") not in (None, *_TAINT_EFFECTS) or set(tol) - {
                    "key", "operator", "value", "effect", "tolerationSeconds"}:
                raise LaunchConfigError(f"tolerations[{i}]={tol!r}: expected key, operator, value, effect "
                                        f"({'/'.join(_TAINT_EFFECTS)})")
        if self.active_deadline_s is not None and self.active_deadline_s < 1:
            raise bad("active_deadline_s", "must be >= 1 second")


def load_params(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, str]:
    """Validate params.yaml plus `key=value` overrides with the project's schema; return the config and the YAML
    the trainer pods will read (the resolved parameters, so the pods see exactly what was validated here)."""
    cfg = load_config(path, overrides)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return cfg, text


# ------------------------------------------------------------------------------------------------ manifests
def _labels(spec: TrainJobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "lightclip", "app.kubernetes.io/component": "train",
            "app.kubernetes.io/managed-by": "lightclip-launcher", JOB_LABEL: spec.name}


def _env(spec: TrainJobSpec) -> list[dict[str, Any]]:
    env = [{"name": name, "valueFrom": {"configMapKeyRef": {"name": spec.mlflow_configmap, "key": name,
                                                            **({"optional": True} if optional else {})}}}
           for name, optional in MLFLOW_CONFIGMAP_KEYS.items()]
    for secret, keys in ((spec.s3_secret, S3_SECRET_KEYS), (spec.mlflow_auth_secret, MLFLOW_AUTH_SECRET_KEYS)):
        env += [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name,
                                                              **({"optional": True} if optional else {})}}}
                for name, optional in keys.items()]
    return env


def _resources(spec: TrainJobSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.cpu is not None:
        requests["cpu"] = limits["cpu"] = str(spec.cpu)
    if spec.memory is not None:
        requests["memory"] = limits["memory"] = str(spec.memory)
    if spec.gpus_per_node:
        requests[spec.gpu_resource] = limits[spec.gpu_resource] = spec.gpus_per_node
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _pod_patch(spec: TrainJobSpec) -> dict[str, Any]:
    shm: dict[str, Any] = {"medium": "Memory", **({"sizeLimit": spec.shm_size} if spec.shm_size else {})}
    volumes = [{"name": "params", "configMap": {"name": spec.params_configmap}},
               {"name": "dshm", "emptyDir": shm}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "params", "mountPath": PARAMS_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": SHM_DIR}, {"name": "tmp", "mountPath": TMP_DIR}]
    if spec.workspace_pvc:
        volumes.append({"name": "workspace", "persistentVolumeClaim": {"claimName": spec.workspace_pvc}})
        mounts.append({"name": "workspace", "mountPath": WORKSPACE_DIR})
    container = {"name": NODE_JOB, "volumeMounts": mounts, "securityContext": dict(CONTAINER_SECURITY_CONTEXT),
                 "env": [{"name": "HOME", "value": TMP_DIR}]}  # caches (torch, matplotlib) under the writable /tmp
    pod: dict[str, Any] = {"securityContext": dict(POD_SECURITY_CONTEXT), "volumes": volumes, "containers": [container]}
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    return {"metadata": {"labels": {JOB_LABEL: spec.name, MLFLOW_CLIENT_LABEL: "true"}}, "spec": pod}


def trainer_args(spec: TrainJobSpec) -> list[str]:
    """torchrun's arguments: the module and the `lightclip train` command line (torchrun takes nodes, procs per
    node, rank and master from the PET_* variables the Trainer's torch policy sets)."""
    return ["--module", "lightclip_core.cli", "train", "--params", f"{PARAMS_DIR}/{PARAMS_FILE}",
            "--data", spec.data, "--out", spec.out]


def build_trainjob(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob object for `spec` (checked first)."""
    spec.check()
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": spec.runtime_kind, "name": spec.runtime},
            "trainer": {
                "image": spec.image,
                "command": ["torchrun"],
                "args": trainer_args(spec),
                "numNodes": spec.nodes,
                "numProcPerNode": spec.nproc,
                "resourcesPerNode": _resources(spec),
                "env": _env(spec),
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": NODE_JOB,
                    "template": {"spec": {"template": _pod_patch(spec)}},
                }]}}},
            }],
        },
    }
    if spec.active_deadline_s:
        body["spec"]["activeDeadlineSeconds"] = spec.active_deadline_s
    return body


def build_params_configmap(spec: TrainJobSpec, params_text: str, owner: dict[str, Any] | None = None
                           ) -> dict[str, Any]:
    """The ConfigMap holding params.yaml; `owner` (the created TrainJob) makes it garbage-collected with it."""
    metadata: dict[str, Any] = {"name": spec.params_configmap, "namespace": spec.namespace, "labels": _labels(spec)}
    if owner is not None:
        metadata["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": "TrainJob",
                                        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                        "blockOwnerDeletion": False}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {PARAMS_FILE: params_text}}
