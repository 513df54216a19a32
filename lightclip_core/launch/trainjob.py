"""Multi-node training as a Kubeflow Trainer v2 `TrainJob` (`trainer.kubeflow.org/v1alpha1`).

The TrainJob references our torch runtime (infra/k8s: a namespaced `TrainingRuntime`, or a cluster-wide
`ClusterTrainingRuntime` an administrator installed) and runs `torchrun -m lightclip_core.cli train` on N nodes with
M processes each; the runtime's torch policy gives torchrun its PET_* environment (nodes, rank, master).

The parameters travel as they were validated: the launcher loads params.yaml plus `--set` overrides with the
project's schema before anything is created, and ships the resolved parameters in a ConfigMap mounted in every
trainer pod. The ConfigMap is created right after the TrainJob with an owner reference to it, so deleting the
TrainJob (or the Trainer's clean-up) deletes it too; both also carry the label `lightclip.dev/trainjob=<name>`
for a manual `kubectl delete cm -l`. Pods that start before the ConfigMap exists wait for the mount (kubelet
retries it); a failed ConfigMap creation deletes the TrainJob again.

Kubernetes calls go through the `kubernetes` client objects passed in (`CustomObjectsApi`, `CoreV1Api`), and only
the calls listed in `API_CALLS`: the RBAC role in infra/k8s is checked against that list.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from lightclip_core.launch.manifests import (COMPLETION_INDEX_LABEL, GROUP, JOBSET_LABEL, NODE_JOB, PLURAL, VERSION,
                                             AlreadyExists, ApiUnavailable, LaunchError, TrainJobFailed, TrainJobSpec,
                                             TrainJobTimeout, build_params_configmap, build_trainjob)


# ------------------------------------------------------------------------------------------------ API calls
def _status_of(err: Exception) -> int | None:
    return getattr(err, "status", None) if type(err).__name__ == "ApiException" else None


def _api_message(err: Exception) -> str:
    body = getattr(err, "body", None)
    try:
        message = json.loads(body)["message"] if body else None
    except (ValueError, KeyError, TypeError):
        message = None
    return " ".join(str(message or getattr(err, "reason", None) or err).split())[:500]


def _is_unreachable(err: Exception) -> bool:
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 comes with the kubernetes client
        Urllib3Error = ()  # noqa: N806
    return isinstance(err, (ConnectionError, TimeoutError, Urllib3Error)) or (
        _status_of(err) == 0)  # the client reports a failed connection as ApiException(status=0)


def _call(what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """One API call; an unreachable server or an HTTP error becomes a one-line LaunchError."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - translated to one line, the cause kept
        status = _status_of(err)
        if status is None and not _is_unreachable(err):
            raise
        if _is_unreachable(err):
            reason = " ".join(str(getattr(err, "reason", None) or err).split())[:300]
            raise ApiUnavailable(f"{what}: Kubernetes API unreachable ({type(err).__name__}: {reason})") from err
        if status == 409:
            raise AlreadyExists(f"{what}: already exists ({_api_message(err)})") from err
        hint = {401: "check the kubeconfig credentials", 403: "the service account lacks RBAC permission",
                404: "not found (is Kubeflow Trainer installed, and the namespace right?)",
                422: "rejected by the API server's validation"}.get(status, "")
        raise LaunchError(f"{what}: HTTP {status}: {_api_message(err)}" + (f" ({hint})" if hint else "")) from err


@dataclass
class Submitted:
    name: str
    namespace: str
    uid: str
    params_configmap: str


class TrainJobLauncher:
    """Creates, waits for and cancels TrainJobs through the given `kubernetes` client objects."""

    def __init__(self, custom_api: Any, core_api: Any, *, poll_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.custom, self.core = custom_api, core_api
        self.poll_s, self.sleep, self.clock = poll_s, sleep, clock

    # -- submit
    def submit(self, spec: TrainJobSpec, params_text: str) -> Submitted:
        """Create the TrainJob, then its params ConfigMap (owned by it). Nothing is created if `spec` is invalid."""
        body = build_trainjob(spec)
        where = f"trainjob {spec.name!r} in namespace {spec.namespace!r}"
        try:
            created = _call(f"create {where}", self.custom.create_namespaced_custom_object,
                            group=GROUP, version=VERSION, namespace=spec.namespace, plural=PLURAL, body=body)
        except AlreadyExists:
            raise AlreadyExists(f"{where} already exists: choose another --name, or delete it with "
                                f"`kubectl delete trainjob {spec.name} -n {spec.namespace}`") from None
        configmap = build_params_configmap(spec, params_text, owner=created)
        try:
            _call(f"create configmap {spec.params_configmap!r}", self.core.create_namespaced_config_map,
                  namespace=spec.namespace, body=configmap)
        except LaunchError:  # without its parameters the job cannot run: take it back
            self._delete_trainjob(spec.name, spec.namespace, missing_ok=True)
            raise
        return Submitted(spec.name, spec.namespace, created["metadata"].get("uid", ""), spec.params_configmap)

    # -- wait
    def get(self, name: str, namespace: str) -> dict[str, Any]:
        return _call(f"get trainjob {name!r} in namespace {namespace!r}", self.custom.get_namespaced_custom_object,
                     group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=name)

    def wait(self, name: str, namespace: str, timeout_s: float = 24 * 3600.0) -> dict[str, Any]:
        """Poll the TrainJob's conditions until Complete (returns the object) or Failed (raises TrainJobFailed);
        raises TrainJobTimeout after `timeout_s` (the job keeps running)."""
        deadline = self.clock() + timeout_s
        while True:
            job = self.get(name, namespace)
            conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions", [])}
            failed = conditions.get("Failed")
            if failed and failed.get("status") == "True":
                raise self._failure(job, failed)
            complete = conditions.get("Complete")
            if complete and complete.get("status") == "True":
                return job
            if self.clock() >= deadline:
                state = ", ".join(f"{t}={c.get('status')}" for t, c in conditions.items()) or "no conditions yet"
                raise TrainJobTimeout(f"trainjob {name!r} in namespace {namespace!r} not finished after "
                                      f"{timeout_s:g} s ({state}); it keeps running, cancel it with "
                                      f"`kubectl delete trainjob {name} -n {namespace}`")
            self.sleep(min(self.poll_s, max(deadline - self.clock(), 0.0)))

    def _failure(self, job: dict[str, Any], condition: dict[str, Any]) -> TrainJobFailed:
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        failed_jobs = [f"{s['name']} ({s['failed']} failed)" for s in (job.get("status") or {}).get("jobsStatus", [])
                       if s.get("failed")]
        failed_nodes = self._failed_nodes(name, namespace) if failed_jobs else []
        return TrainJobFailed(name, namespace, condition.get("reason", "Unknown"), condition.get("message", ""),
                              failed_jobs, failed_nodes)

    def failed_pods(self, name: str, namespace: str) -> list[Any]:
        pods = _call(f"list pods of trainjob {name!r}", self.core.list_namespaced_pod, namespace=namespace,
                     label_selector=f"{JOBSET_LABEL}={name}")
        return [p for p in pods.items if p.status is not None and p.status.phase == "Failed"]

    def _failed_nodes(self, name: str, namespace: str) -> list[str]:
        """Which nodes failed and how (best effort: the job's failure is reported even if this cannot be read)."""
        try:
            pods = self.failed_pods(name, namespace)
        except LaunchError:
            return []
        nodes = []
        for pod in pods:
            index = (pod.metadata.labels or {}).get(COMPLETION_INDEX_LABEL, "?")
            how = []
            for status in pod.status.container_statuses or []:
                term = status.state.terminated if status.state is not None else None
                if term is not None and term.exit_code:
                    how.append(f"{status.name} exit {term.exit_code}" + (f" {term.reason}" if term.reason else ""))
            nodes.append(f"node {index} (pod {pod.metadata.name}" + (f": {', '.join(how)}" if how else "") + ")")
        return nodes

    def node_log(self, name: str, namespace: str, pod: str, tail_lines: int = 50) -> str:
        """The last lines of a trainer pod's log (for example the failed node's)."""
        return _call(f"read log of pod {pod!r}", self.core.read_namespaced_pod_log, name=pod, namespace=namespace,
                     container=NODE_JOB, tail_lines=tail_lines)

    # -- cancel
    def cancel(self, name: str, namespace: str) -> None:
        """Delete the TrainJob (its JobSet and pods follow) and its params ConfigMap."""
        self._delete_trainjob(name, namespace, missing_ok=False)
        try:  # normally garbage-collected through the owner reference; deleting it here makes that immediate
            _call(f"delete configmap {name}-params", self.core.delete_namespaced_config_map,
                  name=f"{name}-params", namespace=namespace)
        except LaunchError as err:
            if "HTTP 404" not in str(err):
                raise

    def _delete_trainjob(self, name: str, namespace: str, missing_ok: bool) -> None:
        try:
            _call(f"delete trainjob {name!r} in namespace {namespace!r}", self.custom.delete_namespaced_custom_object,
                  group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=name,
                  propagation_policy="Foreground")
        except LaunchError as err:
            if not (missing_ok and "HTTP 404" in str(err)):
                raise
