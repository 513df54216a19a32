"""The LightCLIP Kubeflow DAG: prepare -> teacher -> reinforce (fan-out over shard groups, then one join) -> train ->
export -> evaluate -> register (only when the evaluation gate passes).

    python pipelines/full.py compile -o full.yaml [--image REGISTRY/lightclip:TAG] [--params params.yaml]
    python pipelines/full.py submit --host URL [--experiment NAME] [--param key=value ...]

`--param` takes orchestration settings (`train_gpus=8`, `storage_root=s3://bucket/prefix`; see
lightclip_core/pipeline/arguments.py) and params.yaml overrides (`train.lr=5e-4`); both are validated by the project's
schema before anything is compiled or sent. The components run on the project image (infra/docker), read MLflow
settings from the ConfigMap `lightclip-mlflow` and S3 / MLflow credentials from the Secrets `lightclip-s3` and
`lightclip-mlflow-auth`, as environment variables. Each task's CPU and memory requests and limits come from the
`resources` section of params.yaml and are fixed when the pipeline is compiled. docs/KUBEFLOW.md has the whole
walk-through.
"""

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/full.py` from anywhere: the components live next to this folder
    sys.path.insert(0, str(ROOT))

from lightclip_core.config import ConfigError, validate  # noqa: E402
from lightclip_core.launch.manifests import MLFLOW_CLIENT_LABEL, RUN_AS_USER  # noqa: E402
from lightclip_core.pipeline.arguments import ORCHESTRATION, pipeline_arguments  # noqa: E402

MLFLOW_CONFIGMAP = "lightclip-mlflow"
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
              "AWS_DEFAULT_REGION")
S3_SECRET, S3_KEYS = "lightclip-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET, MLFLOW_KEYS = "lightclip-mlflow-auth", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_REJECTED = 2, 3, 1


def build_pipeline(defaults: dict, image: str | None = None, parallelism: int = 4, shm_size: str = "16Gi",
                   retries: int = 2):
    """The pipeline function, its parameters defaulting to `defaults` (pipeline_arguments' output). `image`,
    `parallelism` (reinforcement tasks at once), `shm_size` and each task's CPU and memory (`resources` of the
    validated params) are fixed at compile time."""
    sizes = validate(json.loads(defaults["params"])).resources
    if image:
        os.environ["LIGHTCLIP_IMAGE"] = image
    from kfp import dsl, kubernetes

    from components.evaluate import evaluate
    from components.export import export
    from components.prepare import prepare
    from components.register import register
    from components.reinforce import plan_reinforce, publish_reinforced, reinforce
    from components.teacher import teacher
    from components.image import IMAGE as image_used
    from components.train import local_gpus, train

    def configure(task, size, *, cache: bool, retry: bool = True):
        """Every task: CPU and memory requests and limits (`size`, a section of `resources`), environment from the
        ConfigMap and Secrets (the MLflow login is required: the tracking server authenticates), the pod label the
        MLflow NetworkPolicy admits, the images' non-root user, caching only where the step is pure, retries on the
        transient ones (network, preemption)."""
        task.set_cpu_request(size.cpu_request).set_cpu_limit(size.cpu_limit)
        task.set_memory_request(size.memory_request).set_memory_limit(size.memory_limit)
        kubernetes.use_config_map_as_env(task, MLFLOW_CONFIGMAP, {k: k for k in MLFLOW_ENV}, optional=True)
        kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_KEYS}, optional=True)
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {k: k for k in MLFLOW_KEYS}, optional=False)
        kubernetes.add_pod_label(task, MLFLOW_CLIENT_LABEL, "true")  # infra/k8s NetworkPolicy
        # what kfp can set of the restricted Pod Security Standard; the KFP backend adds the rest (docs/KUBEFLOW.md)
        kubernetes.set_security_context(task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, run_as_non_root=True)
        task.set_caching_options(cache)
        if retry and retries:
            task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="1h")
        return task

    @dsl.pipeline(name="lightclip-full", description=__doc__.splitlines()[0])
    def full(params: str = defaults["params"],
             storage_root: str = defaults["storage_root"],
             reinforce_groups: int = defaults["reinforce_groups"],
             train_nodes: int = defaults["train_nodes"],
             train_gpus: int = defaults["train_gpus"],
             gpu_resource: str = defaults["gpu_resource"],
             node_selector: dict = defaults["node_selector"],
             tolerations: list = defaults["tolerations"]):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = configure(prepare(params=params, storage_root=storage_root), sizes.prepare, cache=True)
        teachers = configure(teacher(params=params, storage_root=storage_root, train=data.outputs["train"]),
                             sizes.teacher, cache=True)
        plan = configure(plan_reinforce(train=data.outputs["train"], groups=reinforce_groups), sizes.control,
                         cache=True)
        with dsl.ParallelFor(plan.output, parallelism=parallelism) as shards:
            group = configure(reinforce(params=params, storage_root=storage_root, train=data.outputs["train"],
                                        teacher=teachers.outputs["model"], shards=shards), sizes.reinforce, cache=True)
        joined = configure(publish_reinforced(params=params, storage_root=storage_root, train=data.outputs["train"],
                                              teacher=teachers.outputs["model"], groups=dsl.Collected(group.output)),
                           sizes.control, cache=True)

        here = configure(local_gpus(nodes=train_nodes, gpus=train_gpus), sizes.control, cache=False, retry=False)
        trained = configure(train(params=params, storage_root=storage_root, run_id=run_id,
                                  data=joined.outputs["reinforced"], nodes=train_nodes, gpus=train_gpus,
                                  image=image_used, gpu_resource=gpu_resource, node_selector=node_selector,
                                  tolerations=tolerations, shm_size=shm_size),
                            sizes.train, cache=False)
        trained.set_accelerator_type(gpu_resource).set_accelerator_limit(here.output).after(here)
        kubernetes.empty_dir_mount(trained, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=shm_size)
        kubernetes.add_node_selector_json(trained, node_selector)
        kubernetes.add_toleration_json(trained, tolerations)

        exported = configure(export(params=params, storage_root=storage_root, run_id=run_id,
                                    checkpoint=trained.outputs["checkpoint"]), sizes.export, cache=False)
        evaluated = configure(evaluate(params=params, storage_root=storage_root, run_id=run_id,
                                       model=exported.outputs["model"], test=data.outputs["test"],
                                       checkpoint=trained.outputs["checkpoint"]), sizes.evaluate, cache=False)
        with dsl.If(evaluated.outputs["Output"] == True, name="evaluation-gate"):  # noqa: E712 - a KFP condition
            configure(register(params=params, run_id=run_id, model=exported.outputs["model"],
                               evaluation=evaluated.outputs["report"], checkpoint=trained.outputs["checkpoint"],
                               train=joined.outputs["reinforced"], test=data.outputs["test"]),
                      sizes.registry, cache=False, retry=False)  # a retry would register a second version

    return full


def compile_pipeline(out, params="params.yaml", image=None,
                     pairs: list[str] | None = None, parallelism: int = 4, shm_size: str = "16Gi") -> Path:
    from kfp import compiler

    defaults = pipeline_arguments(params, pairs or [])
    pipeline = build_pipeline(defaults, image=image, parallelism=parallelism, shm_size=shm_size)
    compiler.Compiler().compile(pipeline, str(out))
    return Path(out)


def submit(host: str, params: str | None, pairs: list[str], experiment: str | None, image: str | None,
           run_name: str | None = None, namespace: str | None = None) -> str:
    """Compile with the validated arguments and create a run; returns the run id. Raises ConnectionError when the
    endpoint cannot be reached and RuntimeError when it answers with an error or rejects the run."""
    import kfp
    import kfp_server_api
    import urllib3

    arguments = pipeline_arguments(params, pairs)
    check_endpoint(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "full.yaml", params, image, pairs)
        try:
            with warnings.catch_warnings():  # kfp.Client's version notice is not an error of this run
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
            run = client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=run_name,
                                                          experiment_name=experiment, namespace=namespace)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ConnectionError(f"Kubeflow Pipelines endpoint {host} is unreachable: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]}") from None
        except kfp_server_api.ApiException as err:
            raise RuntimeError(f"Kubeflow Pipelines at {host} rejected the run: HTTP {err.status} {err.reason}: "
                               f"{(err.body or '').strip()[:300]}") from None
    return run.run_id


def check_endpoint(host: str, timeout_s: float = 10.0) -> None:
    """One request to the KFP API's health endpoint, before anything is uploaded (kfp.Client would otherwise retry
    for half a minute and log every attempt)."""
    import requests

    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        answer = requests.get(url, timeout=timeout_s)
    except requests.RequestException as err:
        raise ConnectionError(f"Kubeflow Pipelines endpoint {host} is unreachable: {type(err).__name__}") from None
    if not answer.ok:
        raise RuntimeError(f"Kubeflow Pipelines endpoint {host} answered HTTP {answer.status_code} on {url}: "
                           f"{answer.text.strip()[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/full.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=str(ROOT / "params.yaml"), help="params.yaml the defaults come from")
    common.add_argument("--image", default=None, help="the project image (default: components/image.py)")
    common.add_argument("--param", dest="pairs", action="append", default=[], metavar="KEY=VALUE",
                        help=f"orchestration setting ({', '.join(ORCHESTRATION)}) or params.yaml override "
                             f"(section.field=value); repeatable")
    c = sub.add_parser("compile", parents=[common], help="compile the pipeline to YAML")
    c.add_argument("-o", "--output", default="full.yaml")
    c.add_argument("--parallelism", type=int, default=4, help="reinforcement tasks running at once")
    c.add_argument("--shm-size", default="16Gi", help="size of the training task's memory-backed /dev/shm")
    s = sub.add_parser("submit", parents=[common], help="compile and start a run on a KFP endpoint")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    s.add_argument("--experiment", default=None, help="KFP experiment (default: the endpoint's default)")
    s.add_argument("--run-name", default=None)
    s.add_argument("--namespace", default=None, help="the user namespace of a multi-user KFP deployment")
    args = parser.parse_args(argv)
    try:
        if args.command == "compile":
            if args.parallelism < 1:
                raise ConfigError(f"--parallelism={args.parallelism}: must be at least 1")
            out = compile_pipeline(args.output, args.params, args.image, args.pairs, args.parallelism, args.shm_size)
            print(f"compiled {out}")
        else:
            print(f"submitted run {submit(args.host, args.params, args.pairs, args.experiment, args.image, args.run_name, args.namespace)}")
    except ConfigError as err:
        print(f"full.py {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConnectionError as err:
        print(f"full.py submit: error: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RuntimeError as err:
        print(f"full.py submit: error: {err}", file=sys.stderr)
        return EXIT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
