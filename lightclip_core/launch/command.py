"""`lightclip trainjob`: train on several nodes through a Kubeflow Trainer TrainJob.

Wiring into lightclip_core/cli.py: `add_trainjob_command(sub)` registers the sub-command (with its own `--params`
and `--set`), and `main` dispatches `args.handler(args)` for it (it returns the exit code) instead of the stage table.
Bad arguments or parameters: one line, exit code 2, nothing created. A failed, timed-out or rejected job, or an
unreachable API: one line, exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import yaml

from lightclip_core.config import ConfigError
from lightclip_core.launch.manifests import (DEFAULT_MLFLOW_AUTH_SECRET, DEFAULT_MLFLOW_CONFIGMAP, DEFAULT_RUNTIME,
                                             DEFAULT_S3_SECRET, RUNTIME_KINDS, ApiUnavailable, LaunchConfigError,
                                             LaunchError, TrainJobFailed, TrainJobSpec, build_params_configmap,
                                             build_trainjob, load_params)
from lightclip_core.launch.trainjob import TrainJobLauncher

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def add_trainjob_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("trainjob", help="train on several nodes: submit a Kubeflow Trainer TrainJob",
                              description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="parameter file, validated before anything is created")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set train.lr=5e-4 (repeatable)")
    p.add_argument("--nodes", type=int, required=True, help="number of training nodes (pods)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node; one process each (0: CPU)")
    p.add_argument("--procs-per-node", type=int, default=None, help="CPU nodes only: processes per node")
    p.add_argument("--image", required=True, help="the project image, e.g. registry/lightclip:cuda-0.1.0")
    p.add_argument("--data", required=True, help="training split as the pods see it (e.g. /workspace/...)")
    p.add_argument("--out", required=True, help="output directory as the pods see it")
    p.add_argument("--name", default=None, help="TrainJob name (default: lightclip-train-<UTC time>)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, help=f"training runtime name (default {DEFAULT_RUNTIME})")
    p.add_argument("--runtime-kind", default="TrainingRuntime", choices=RUNTIME_KINDS)
    p.add_argument("--cpu", default="8", help="CPU request and limit per node")
    p.add_argument("--memory", default="32Gi", help="memory request and limit per node")
    p.add_argument("--gpu-resource", default="nvidia.com/gpu")
    p.add_argument("--shm-size", default="16Gi", help="size limit of the memory-backed /dev/shm")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                   help="tolerate a taint; without =VALUE the operator is Exists")
    p.add_argument("--workspace-pvc", default=None, help="ReadWriteMany claim mounted at /workspace on every node")
    p.add_argument("--service-account", default=None)
    p.add_argument("--mlflow-configmap", default=DEFAULT_MLFLOW_CONFIGMAP)
    p.add_argument("--s3-secret", default=DEFAULT_S3_SECRET, help="Secret with AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY")
    p.add_argument("--mlflow-auth-secret", default=DEFAULT_MLFLOW_AUTH_SECRET,
                   help="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD")
    p.add_argument("--active-deadline", type=int, default=None, metavar="SECONDS")
    p.add_argument("--wait", action="store_true", help="wait until the TrainJob completes or fails")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="with --wait: seconds (default one day)")
    p.add_argument("--poll", type=float, default=15.0, help="with --wait: seconds between status reads")
    p.add_argument("--dry-run", action="store_true", help="print the ConfigMap and TrainJob; create nothing")
    p.add_argument("--crd", default=None, help="with --dry-run: check the TrainJob against this CRD file")
    p.set_defaults(handler=run_trainjob)
    return p


def parse_node_selector(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchConfigError(f"--node-selector={pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def parse_toleration(text: str) -> dict[str, Any]:
    """`key=value:Effect`, `key:Effect` (any value), `key=value` or `key` (every effect)."""
    body, _, effect = text.rpartition(":") if ":" in text else (text, "", "")
    key, sep, value = body.partition("=")
    if not key:
        raise LaunchConfigError(f"--toleration={text!r}: expected KEY[=VALUE][:EFFECT]")
    tol: dict[str, Any] = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def spec_from_args(args: argparse.Namespace) -> TrainJobSpec:
    name = args.name or time.strftime("lightclip-train-%Y%m%d-%H%M%S", time.gmtime())
    spec = TrainJobSpec(
        name=name, image=args.image, data=args.data, out=args.out, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node, namespace=args.namespace,
        runtime=args.runtime, runtime_kind=args.runtime_kind, cpu=args.cpu, memory=args.memory,
        gpu_resource=args.gpu_resource, shm_size=args.shm_size, node_selector=parse_node_selector(args.node_selector),
        tolerations=[parse_toleration(t) for t in args.toleration], mlflow_configmap=args.mlflow_configmap,
        s3_secret=args.s3_secret, mlflow_auth_secret=args.mlflow_auth_secret, workspace_pvc=args.workspace_pvc,
        service_account=args.service_account, active_deadline_s=args.active_deadline)
    spec.check()
    return spec


def kubernetes_apis() -> tuple[Any, Any]:
    """CustomObjectsApi and CoreV1Api from the in-cluster service account, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise ApiUnavailable(f"no Kubernetes configuration (in-cluster or kubeconfig): "
                                 f"{' '.join(str(err).split())}") from None
    return client.CustomObjectsApi(), client.CoreV1Api()


def run_trainjob(args: argparse.Namespace, custom_api: Any = None, core_api: Any = None) -> int:
    """The handler: validate everything, then submit (and with --wait, wait). Returns the exit code."""
    def fail(err: Exception, code: int) -> int:
        print(f"lightclip trainjob: error: {err}", file=sys.stderr)
        return code

    try:
        spec = spec_from_args(args)
        _, params_text = load_params(args.params, args.overrides)
    except ConfigError as err:  # LaunchConfigError included: nothing was created
        return fail(err, EXIT_BAD_INPUT)
    if args.dry_run:
        trainjob = build_trainjob(spec)
        if args.crd:
            from lightclip_core.launch.crd_schema import CustomResourceInvalid, CustomResourceValidator, load_crd

            try:
                CustomResourceValidator(load_crd(args.crd)).validate(trainjob)
            except CustomResourceInvalid as err:
                return fail(err, EXIT_BAD_INPUT)
        print(yaml.safe_dump_all([build_params_configmap(spec, params_text), trainjob], sort_keys=False), end="")
        return 0
    try:
        if custom_api is None or core_api is None:
            custom_api, core_api = kubernetes_apis()
        launcher = TrainJobLauncher(custom_api, core_api, poll_s=args.poll)
        submitted = launcher.submit(spec, params_text)
        summary: dict[str, Any] = {"trainjob": submitted.name, "namespace": submitted.namespace,
                                   "params_configmap": submitted.params_configmap, "nodes": spec.nodes,
                                   "procs_per_node": spec.nproc}
        if args.wait:
            job = launcher.wait(submitted.name, submitted.namespace, timeout_s=args.timeout)
            summary["conditions"] = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
    except TrainJobFailed as err:
        _print_failed_log(launcher, err)
        return fail(err, EXIT_FAILED)
    except LaunchError as err:
        return fail(err, EXIT_FAILED)
    print(json.dumps(summary, indent=2))
    return 0


def _print_failed_log(launcher: TrainJobLauncher, err: TrainJobFailed) -> None:
    """The tail of the first failed node's log on stderr, before the one-line error (best effort)."""
    try:
        pods = launcher.failed_pods(err.name, err.namespace)
        if pods:
            log = launcher.node_log(err.name, pods[0].metadata.namespace, pods[0].metadata.name)
            print(f"--- last lines of {pods[0].metadata.name} ---\n{log.rstrip()}\n---", file=sys.stderr)
    except LaunchError:
        pass

