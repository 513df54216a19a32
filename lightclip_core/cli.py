"""`lightclip <stage>`: the command line used by DVC stages, Kubeflow components and people.

Each command validates params.yaml (plus `--set key=value` overrides) and its input paths before any work; a bad
value prints one line and exits with code 2. An unreachable tracking server stops a stage before any work with
one line and exit code 3. The stage itself is a function in lightclip_core.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from lightclip_core.config import Config, ConfigError, load_config

log = logging.getLogger("lightclip")

EXIT_BAD_INPUT = 2
EXIT_TRACKING = 3


class InputError(ConfigError):
    """A path given on the command line is missing or of the wrong kind."""


def _existing(path: str, what: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag}={path!r}: {what} does not exist")
    return p


def _local_split(uri: str, what: str, flag: str) -> Path:
    """A shard directory given as a local path or an `s3://` prefix (downloaded to the cache, reused by ETag)."""
    from lightclip_core.data import storage

    if not storage.is_s3(uri):
        return _existing(uri, what, flag)
    if not storage.exists(storage.join(uri, "manifest.json")):
        raise InputError(f"{flag}={uri!r}: {what} has no manifest.json")
    return storage.fetch_to_local(uri.rstrip("/") + "/", storage.default_cache_dir())




def cmd_prepare(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.data.prepare import prepare
    from lightclip_core.tracking.mlflow_utils import StageRun

    with StageRun(cfg, "prepare") as run:
        result = prepare(cfg.data, args.out)
        run.log_metrics({f"samples/{k}": v for k, v in result.counts.items()})
        run.log_metrics({f"skipped/{k}": v for k, v in result.skipped.items()})
    return {"out": str(args.out), "counts": result.counts, "skipped": result.skipped}


def cmd_train(cfg: Config, args: argparse.Namespace) -> dict:
    """Train; under `torchrun --nproc-per-node N -m lightclip_core.cli train ...` every rank runs this, and rank 0
    alone tracks the run and writes the metrics."""
    from lightclip_core.tracking.mlflow_utils import StageRun
    from lightclip_core.train.distributed import world_from_env
    from lightclip_core.train.trainer import train

    from lightclip_core.data import storage

    train_dir = _local_split(args.data, "training split", "--data")
    remote = args.out if storage.is_s3(args.out) else None  # train locally, then publish (final.pt last)
    out = storage.default_cache_dir() / "train-out" / storage.split_s3(remote)[1].strip("/") if remote else Path(args.out)
    if not world_from_env().is_main:
        result = train(cfg, train_dir, out)
        return {"checkpoint": str(result.final_checkpoint), **result.metrics}
    with StageRun(cfg, "train", inputs={"data": train_dir}) as run:
        result = train(cfg, train_dir, out, sink=run)
        run.log_metrics({f"summary/{k}": v for k, v in result.metrics.items()})
        run.log_artifact(result.train_log)
    _write_metrics(out / "metrics.json", result.metrics)
    if remote:
        storage.publish_dir(out, remote, last=("final.pt",))
    return {"checkpoint": storage.join(remote, "final.pt") if remote else str(result.final_checkpoint),
            **result.metrics}


def cmd_teacher(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.reinforce.coca_teacher import train_coca_teacher
    from lightclip_core.tracking.mlflow_utils import StageRun

    train_dir = _existing(args.data, "training split", "--data")
    out = Path(args.out)
    teachers = {"model": cfg.teacher.train, **({"second": cfg.teacher.second} if cfg.teacher.second else {})}
    metrics: dict[str, float] = {}
    with StageRun(cfg, "teacher", inputs={"data": train_dir}) as run:
        for name, teacher in teachers.items():
            prefix = "" if name == "model" else f"{name}/"
            result = train_coca_teacher(teacher, train_dir, out, cfg.model.image.mean, cfg.model.image.std,
                                        sink=_Prefixed(run, prefix), name=name)
            metrics.update({f"{prefix}{k}": v for k, v in result.metrics.items()})
            run.log_artifact(result.log_path)
        run.log_metrics({f"summary/{k}": v for k, v in metrics.items()})
    _write_metrics(out / "metrics.json", metrics)
    return {"models": [str(out / name) for name in teachers], **metrics}


class _Prefixed:
    """A metric sink that prefixes every key (the second teacher's curves next to the first's)."""

    def __init__(self, sink, prefix: str):
        self.sink, self.prefix = sink, prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.sink.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=step)


def cmd_reinforce(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.data.shards import read_manifest
    from lightclip_core.reinforce.stage import parse_shard_range, reinforce
    from lightclip_core.tracking.mlflow_utils import StageRun

    from lightclip_core.data import storage

    data_dir = args.data if storage.is_s3(args.data) else _existing(args.data, "split to reinforce", "--data")
    needs_trained = not cfg.teacher.ensemble or cfg.teacher.captioner is None  # else pretrained teachers only
    teacher_dir = _existing(args.teacher, "teacher directory", "--teacher") if needs_trained and args.teacher \
        else None
    try:
        shards = parse_shard_range(args.shards, len(read_manifest(data_dir)["shards"]))
    except ValueError as err:
        raise InputError(str(err)) from None
    inputs = {"data": data_dir, **({"teacher": teacher_dir} if teacher_dir else {})}
    with StageRun(cfg, "reinforce", inputs=inputs) as run:
        result = reinforce(cfg, data_dir, args.out, teacher_dir, shards, sink=run, publish=not args.no_publish)
        run.log_metrics({f"summary/{k}": v for k, v in result.metrics.items()})
    if not storage.is_s3(args.out):
        _write_metrics(Path(args.out).parent / f"{Path(args.out).name}-metrics.json", result.metrics)
    return {"out": str(result.out_dir), "complete": result.complete, "skipped": result.skipped, **result.metrics}


def cmd_publish_reinforced(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.reinforce.stage import publish_reinforced

    manifest = publish_reinforced(cfg, args.data, args.out, args.teacher)
    reinforcement = manifest.get("reinforcement", {})
    return {"out": args.out, "complete": reinforcement.get("complete"), "shards": len(manifest["shards"]),
            "missing_shards": reinforcement.get("missing_shards")}


def cmd_index_reinforced(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.reinforce.published import index_reinforced

    data_dir = _existing(args.data, "directory of reinforced shards", "--data")
    try:
        manifest = index_reinforced(data_dir, args.dims, args.scales, args.image_size, split=args.split)
    except ValueError as err:
        if type(err) is not ValueError:
            raise
        raise InputError(str(err)) from None
    return {"manifest": str(data_dir / "manifest.json"), "num_samples": manifest["num_samples"],
            "shards": len(manifest["shards"])}


def cmd_export(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.export.exporter import export
    from lightclip_core.tracking.mlflow_utils import StageRun

    checkpoint = _existing(args.checkpoint, "checkpoint", "--checkpoint")
    with StageRun(cfg, "export", inputs={"checkpoint": checkpoint}) as run:
        result = export(cfg, checkpoint, args.out)
        run.log_metrics({f"parity/{k}": v for k, v in _flat_numbers(result.parity).items()})
        run.log_artifact(Path(args.out) / "config.json")
    return {"out": str(args.out), "parity": result.parity}


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.evaluate.stage import evaluate
    from lightclip_core.tracking.mlflow_utils import StageRun

    export_dir = _existing(args.model, "export directory", "--model")
    test_dir = _existing(args.data, "test split", "--data")
    train_log = _existing(args.train_log, "training log", "--train-log") if args.train_log else None
    with StageRun(cfg, "evaluate", inputs={"model": export_dir, "data": test_dir}) as run:
        result = evaluate(cfg, export_dir, test_dir, args.out, train_log=train_log)
        run.log_metrics(result.metrics)
        run.log_artifact(args.out)
    return result.metrics


def cmd_register(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.tracking.mlflow_utils import StageRun
    from lightclip_core.tracking.registry import gate_passes, read_inputs, register, skipped

    export_dir = _existing(args.model, "export directory", "--model")
    eval_dir = _existing(args.eval, "evaluation directory", "--eval")
    inputs = read_inputs(cfg, export_dir, eval_dir, args.train_data, args.test_data, args.train_log)
    if not (cfg.registry.enabled and cfg.tracking.enabled):
        why = "registry.enabled is false" if not cfg.registry.enabled else "tracking.enabled is false"
        return skipped(cfg, inputs, args.out, why).to_json()
    passed, why = gate_passes(cfg, inputs.metrics)
    if not passed:
        return skipped(cfg, inputs, args.out, why).to_json()
    labelled = {"model": export_dir, "eval": eval_dir, "train_data": inputs.train_data, "test_data": inputs.test_data}
    with StageRun(cfg, "register", inputs={k: v for k, v in labelled.items() if v is not None}) as run:
        result = register(cfg, inputs, args.out, run)
    return result.to_json()


def cmd_tracking(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.tracking.spool import sync_spool

    spool = Path(args.spool_dir or cfg.tracking.spool_dir)
    delivered = sync_spool(spool) if spool.is_dir() else {}
    left = sorted(p.name for p in spool.glob("*.jsonl")) if spool.is_dir() else []
    return {"spool_dir": str(spool), "delivered": delivered, "left": left}


def _flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


def _write_metrics(path: Path, metrics: dict) -> None:
    from lightclip_core.data.storage import write_json_atomic

    write_json_atomic(path, metrics)


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], dict], str]] = {
    "prepare": (cmd_prepare, "generate the synthetic dataset or ingest real data into shards"),
    "teacher": (cmd_teacher, "train the embedded default's own CoCa teacher and captioner"),
    "reinforce": (cmd_reinforce, "reinforce a split: augmentations, synthetic captions, teacher embeddings"),
    "publish-reinforced": (cmd_publish_reinforced, "the join after a fan-out of `reinforce --no-publish` workers: "
                                                   "publish the manifest once"),
    "index-reinforced": (cmd_index_reinforced, "write the manifest of published reinforced shards (DataCompDR)"),
    "train": (cmd_train, "train a CLIP model on prepared (or reinforced) shards"),
    "export": (cmd_export, "fold and export a trained checkpoint (safetensors, torch.export, ONNX), parity-checked"),
    "evaluate": (cmd_evaluate, "zero-shot classification and retrieval on the test split"),
    "register": (cmd_register, "register the evaluated model in MLflow; move `champion` if it passes the gate"),
    "tracking": (cmd_tracking, "tracking maintenance: `lightclip tracking sync` uploads spooled operations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set train.lr=5e-4 (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true")
    parsers = {name: sub.add_parser(name, parents=[common], help=help_) for name, (_, help_) in COMMANDS.items()}
    parsers["prepare"].add_argument("--out", default="artifacts/data")
    parsers["teacher"].add_argument("--data", default="artifacts/data/train")
    parsers["teacher"].add_argument("--out", default="artifacts/teacher")
    parsers["reinforce"].add_argument("--data", default="artifacts/data/train")
    parsers["reinforce"].add_argument("--teacher", default="artifacts/teacher",
                                      help="the trained teacher, used where teacher.ensemble/captioner are empty")
    parsers["reinforce"].add_argument("--out", default="artifacts/reinforced/train")
    parsers["reinforce"].add_argument("--shards", default=None, metavar="START:END",
                                      help="reinforce only these shards of the split (a worker of a fan-out)")
    parsers["reinforce"].add_argument("--no-publish", action="store_true",
                                      help="leave the manifest to `lightclip publish-reinforced` (fan-out on S3)")
    parsers["publish-reinforced"].add_argument("--data", default="artifacts/data/train")
    parsers["publish-reinforced"].add_argument("--teacher", default="artifacts/teacher")
    parsers["publish-reinforced"].add_argument("--out", default="artifacts/reinforced/train")
    parsers["index-reinforced"].add_argument("--data", required=True)
    parsers["index-reinforced"].add_argument("--dims", type=int, nargs="+", required=True,
                                             help="each teacher's embedding width, e.g. 768 768 for DataCompDR-12M")
    parsers["index-reinforced"].add_argument("--scales", type=float, nargs="+", required=True,
                                             help="each teacher's fixed distillation scale, e.g. 100 100")
    parsers["index-reinforced"].add_argument("--image-size", type=int, required=True,
                                             help="the size the stored augmentations were sampled at (224)")
    parsers["index-reinforced"].add_argument("--split", default="train")
    parsers["train"].add_argument("--data", default="artifacts/reinforced/train")
    parsers["train"].add_argument("--out", default="artifacts/train")
    parsers["export"].add_argument("--checkpoint", default="artifacts/train/final.pt")
    parsers["export"].add_argument("--out", default="artifacts/export")
    parsers["evaluate"].add_argument("--model", default="artifacts/export")
    parsers["evaluate"].add_argument("--data", default="artifacts/data/test")
    parsers["evaluate"].add_argument("--train-log", default="artifacts/train/train_log.csv")
    parsers["evaluate"].add_argument("--out", default="artifacts/eval")
    parsers["register"].add_argument("--model", default="artifacts/export")
    parsers["register"].add_argument("--eval", default="artifacts/eval")
    parsers["register"].add_argument("--train-data", default="artifacts/reinforced/train")
    parsers["register"].add_argument("--test-data", default="artifacts/data/test")
    parsers["register"].add_argument("--train-log", default="artifacts/train/train_log.csv")
    parsers["register"].add_argument("--out", default="artifacts/register")
    parsers["tracking"].add_argument("action", choices=["sync"],
                                     help="sync: deliver what a stage could not send to the tracking server")
    parsers["tracking"].add_argument("--spool-dir", default=None, help="default: tracking.spool_dir")
    from lightclip_core.launch.command import add_trainjob_command

    add_trainjob_command(sub)  # its own params handling and exit codes (lightclip_core/launch/command.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a rank's exception (traceback, rank, time) goes
        from torch.distributed.elastic.multiprocessing.errors import record  # to the file its failure report shows

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None  # set by torchrun
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") +
                               "%(name)s: %(message)s")
    if args.command == "trainjob":
        return args.handler(args)
    command, _ = COMMANDS[args.command]
    from lightclip_core.data.ingest import DataError
    from lightclip_core.data.reinforced import ReinforcementError
    from lightclip_core.reinforce.teachers import TeacherLoadError
    from lightclip_core.tracking.spool import TrackingUnavailable

    try:
        cfg = load_config(args.params, args.overrides)
        summary = command(cfg, args)
    except (ConfigError, TeacherLoadError) as err:  # bad parameters, paths or teachers: one line, nothing done
        print(f"lightclip {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DataError, ReinforcementError) as err:  # the input data is broken: one line, nothing published
        print(f"lightclip {args.command}: error: {err}", file=sys.stderr)
        return 1
    except TrackingUnavailable as err:  # raised before the stage's work (or by sync): nothing half-done
        print(f"lightclip {args.command}: error: {err}", file=sys.stderr)
        return EXIT_TRACKING
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
