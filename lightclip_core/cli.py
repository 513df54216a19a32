"""`lightclip <stage>`: the command line used by DVC stages, Kubeflow components and people.

Each command validates params.yaml (plus `--set key=value` overrides) and its input paths before any work; a bad
value prints one line and exits with code 2. An unreachable tracking server stops a stage before any work with
one line and exit code 3. Each command parses its arguments and calls the stage's `run_<stage>` function
(lightclip_core.stages), which the Kubeflow component bodies call too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lightclip_core import stages
from lightclip_core.config import Config, ConfigError, load_config

log = logging.getLogger("lightclip")

EXIT_BAD_INPUT = 2
EXIT_TRACKING = 3


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_prepare(cfg=cfg, out=args.out)


def cmd_train(cfg: Config, args: argparse.Namespace) -> Any:
    """Under `torchrun --nproc-per-node N -m lightclip_core.cli train ...` every rank runs this."""
    return stages.run_train(cfg=cfg, data=args.data, out=args.out)


def cmd_teacher(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_teacher(cfg=cfg, data=args.data, out=args.out, val=args.val)


def cmd_reinforce(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_reinforce(cfg=cfg, data=args.data, teacher=args.teacher, out=args.out, shards=args.shards,
                                publish=not args.no_publish)


def cmd_publish_reinforced(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_publish_reinforced(cfg=cfg, data=args.data, teacher=args.teacher, out=args.out)


def cmd_index_reinforced(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_index_reinforced(data=args.data, dims=args.dims, scales=args.scales,
                                       image_size=args.image_size, split=args.split)


def cmd_export(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_export(cfg=cfg, checkpoint=args.checkpoint, out=args.out)


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> Any:
    train_log = args.train_log or (TRAIN_LOG if Path(TRAIN_LOG).is_file() else None)
    return stages.run_evaluate(cfg=cfg, model=args.model, data=args.data, train_log=train_log, out=args.out)


def cmd_register(cfg: Config, args: argparse.Namespace) -> Any:
    return stages.run_register(cfg=cfg, model=args.model, eval=args.eval, train_data=args.train_data,
                               test_data=args.test_data, train_log=args.train_log, out=args.out)


def cmd_tracking(cfg: Config, args: argparse.Namespace) -> dict:
    from lightclip_core.tracking.mlflow_utils import experiment_url
    from lightclip_core.tracking.spool import sync_spool

    if args.action == "url":
        return {"experiment": cfg.tracking.experiment, "runs": experiment_url(cfg.tracking, args.ui)}
    spool = Path(args.spool_dir or cfg.tracking.spool_dir)
    delivered = sync_spool(spool) if spool.is_dir() else {}
    left = sorted(p.name for p in spool.glob("*.jsonl")) if spool.is_dir() else []
    return {"spool_dir": str(spool), "delivered": delivered, "left": left}


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], Any], str]] = {
    "prepare": (cmd_prepare, "generate the synthetic dataset or ingest real data into shards"),
    "teacher": (cmd_teacher, "train the embedded default's own CoCa teacher and captioner"),
    "reinforce": (cmd_reinforce, "reinforce a split: augmentations, synthetic captions, teacher embeddings"),
    "publish-reinforced": (cmd_publish_reinforced, "the join after a fan-out of `reinforce --no-publish` workers: "
                                                   "publish the manifest once"),
    "index-reinforced": (cmd_index_reinforced, "write the manifest of published reinforced shards (DataCompDR)"),
    "train": (cmd_train, "train a CLIP model on prepared (or reinforced) shards"),
    "export": (cmd_export, "fold and export a trained checkpoint (safetensors, torch.export, ONNX), parity-checked"),
    "evaluate": (cmd_evaluate, "zero-shot classification and retrieval on the test split and the benchmark sets"),
    "register": (cmd_register, "register the evaluated model in MLflow; move `champion` if it passes the gate"),
    "tracking": (cmd_tracking, "tracking maintenance: `lightclip tracking sync` uploads spooled operations"),
}


TRAIN_LOG = "artifacts/train/train_log.csv"
_DATA = "a split's directory (manifest.json and shards) or `s3://` prefix"


def _flag(*names: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return names, kwargs


# every stage's own flags, each with its help text; the same input has the same flag in every stage (--data a
# split or a prepared root, --model an exported model, --out the stage's output); `--help` shows the defaults
FLAGS: dict[str, list[tuple[tuple[str, ...], dict[str, Any]]]] = {
    "prepare": [_flag("--out", default="artifacts/data", help="the prepared root: train/, val/ and test/ splits")],
    "teacher": [
        _flag("--data", default="artifacts/data/train", help=f"the training split: {_DATA}, or a prepared root"),
        _flag("--val", default=None, help="the validation split the teachers' quality is measured on; None: `val` "
                                          "next to --data"),
        _flag("--out", default="artifacts/teacher", help="the trained teachers and their metrics")],
    "reinforce": [
        _flag("--data", default="artifacts/data/train", help=f"the split to reinforce: {_DATA}, or a prepared root"),
        _flag("--teacher", default="artifacts/teacher",
              help="the trained teacher, used where teacher.ensemble/captioner are empty"),
        _flag("--out", default="artifacts/reinforced/train", help="the reinforced split"),
        _flag("--shards", default=None, metavar="START:END",
              help="reinforce only these shards of the split (a worker of a fan-out); None: all"),
        _flag("--no-publish", action="store_true",
              help="leave the manifest to `lightclip publish-reinforced` (fan-out on S3)")],
    "publish-reinforced": [
        _flag("--data", default="artifacts/data/train", help="the split the workers reinforced"),
        _flag("--teacher", default="artifacts/teacher", help="the trained teacher the workers used"),
        _flag("--out", default="artifacts/reinforced/train", help="the reinforced split whose manifest is written")],
    "index-reinforced": [
        _flag("--data", required=True, help="a folder or `s3://` prefix of published reinforced shards"),
        _flag("--dims", type=int, nargs="+", required=True,
              help="each teacher's embedding width, e.g. 768 768 for DataCompDR-12M"),
        _flag("--scales", type=float, nargs="+", required=True,
              help="each teacher's fixed distillation scale, e.g. 100 100"),
        _flag("--image-size", type=int, required=True,
              help="the size the stored augmentations were sampled at (224)"),
        _flag("--split", default="train", help="the split name the manifest records")],
    "train": [
        _flag("--data", default="artifacts/reinforced/train",
              help=f"the (prepared or reinforced) training split: {_DATA}, or a prepared root"),
        _flag("--out", default="artifacts/train", help="checkpoints, final.pt, train_log.csv and metrics.json")],
    "export": [
        _flag("--model", "--checkpoint", dest="checkpoint", default="artifacts/train/final.pt",
              help="the trained checkpoint (train's final.pt or a step checkpoint)"),
        _flag("--out", default="artifacts/export", help="the exported model")],
    "evaluate": [
        _flag("--model", default="artifacts/export", help="the exported model (export's --out)"),
        _flag("--data", default="artifacts/data/test", help=f"the test split: {_DATA}, or a prepared root"),
        _flag("--train-log", default=None,
              help=f"train's train_log.csv, for the training curves in the report; None: {TRAIN_LOG} when it exists"),
        _flag("--out", default="artifacts/eval", help="metrics.json, per-class results, plots and the report")],
    "register": [
        _flag("--model", default="artifacts/export", help="the exported model (export's --out)"),
        _flag("--eval", default="artifacts/eval", help="its evaluation (evaluate's --out)"),
        _flag("--train-data", default="artifacts/reinforced/train", help="the split it was trained on"),
        _flag("--test-data", default="artifacts/data/test", help="the split it was evaluated on"),
        _flag("--train-log", default=TRAIN_LOG, help="train's train_log.csv"),
        _flag("--out", default="artifacts/register", help="the registration decision and the report")],
}


class _OwnLines(logging.Filter):
    """The console shows this project's log lines and other libraries' errors; the rest goes to the log file only
    (open_clip's root-logger lines and "No pretrained weights loaded" warnings for the deliberately untrained
    teachers, ONNX exporter INFO lines, MLflow's messages, Python warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(("lightclip", "__main__")) or record.levelno >= logging.ERROR


def setup_logging(command: str, verbose: bool, rank: str | None) -> Path:
    """Console: this project's lines (INFO, or DEBUG with -v); everything at INFO and above, and every Python
    warning, also to `$LIGHTCLIP_LOG_DIR/<command>[.rank<r>].log` (default `logs/`), appended. Returns that path."""
    path = Path(os.environ.get("LIGHTCLIP_LOG_DIR", "logs")) / f"{command}{f'.rank{rank}' if rank else ''}.log"
    fmt = logging.Formatter("%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(name)s: %(message)s")
    console = logging.StreamHandler()
    console.addFilter(_OwnLines())
    handlers: list[logging.Handler] = [console]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    except OSError as err:  # a read-only working directory: the console still gets this project's lines
        print(f"lightclip: no log file ({err}); third-party log lines are dropped", file=sys.stderr)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's own stderr handler, when imported later
    mlflow_logger = logging.getLogger("mlflow")  # and when it was imported before
    for handler in list(mlflow_logger.handlers):
        mlflow_logger.removeHandler(handler)
    mlflow_logger.propagate = True
    return path


def write_stage_metrics(path: str, summary: dict, wall_time_s: float) -> None:
    """The summary's numbers (nested keys slash-joined) and the stage's wall time, written atomically."""
    from lightclip_core.infra.storage import write_json_atomic
    from lightclip_core.stages.io import flat_numbers

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), {**flat_numbers(summary), "wall_time_s": round(wall_time_s, 3)})


def check_metrics_path(path: str) -> None:
    """`--metrics` names a file that can be written after the stage: not a directory, not under a file."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--metrics={path!r}: is a directory; expected a JSON file path")
    parent = next(p for p in target.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--metrics={path!r}: {str(parent)!r} is a file, so the metrics file cannot be created there")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="parameter file")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set train.lr=5e-4 (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug-level log lines")
    common.add_argument("--metrics", default=None, metavar="PATH",
                        help="also write the summary's numbers and the stage's wall time (wall_time_s) to this JSON "
                             "file: the DVC metrics file committed to git (dvc.yaml: cache: false)")
    parsers = {name: sub.add_parser(name, parents=[common], help=help_, description=help_,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
               for name, (_, help_) in COMMANDS.items()}
    for command, flags in FLAGS.items():
        for names, kwargs in flags:
            parsers[command].add_argument(*names, **kwargs)
    parsers["tracking"].add_argument("action", choices=["sync", "url"],
                                     help="sync: deliver what a stage could not send to the tracking server; url: "
                                          "the address of the experiment's training runs in the MLflow UI")
    parsers["tracking"].add_argument("--ui", default="http://127.0.0.1:5000", help="url: the MLflow UI's address")
    parsers["tracking"].add_argument("--spool-dir", default=None, help="the spool to deliver; None: tracking.spool_dir")
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
    setup_logging(args.command, getattr(args, "verbose", False), rank)
    if args.command == "trainjob":
        return args.handler(args)
    command, _ = COMMANDS[args.command]
    from lightclip_core.data.ingest import DataError
    from lightclip_core.data.reinforced import ReinforcementError
    from lightclip_core.reinforce.teachers import TeacherLoadError
    from lightclip_core.tracking.spool import TrackingUnavailable

    try:
        cfg = load_config(args.params, args.overrides)
        if getattr(args, "metrics", None):
            check_metrics_path(args.metrics)
        started = time.perf_counter()
        result = command(cfg, args)
        summary = result if isinstance(result, dict) else result.summary()
        if getattr(args, "metrics", None):
            write_stage_metrics(args.metrics, summary, time.perf_counter() - started)
    except (ConfigError, TeacherLoadError) as err:  # bad parameters, paths or teachers: one line, nothing done
        print(f"lightclip {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DataError, ReinforcementError) as err:  # the input data is broken: one line, nothing published
        print(f"lightclip {args.command}: error: {err}", file=sys.stderr)
        return 1
    except TrackingUnavailable as err:  # raised before the stage's work (or by sync): nothing half-done
        print(f"lightclip {args.command}: error: {err}", file=sys.stderr)
        return EXIT_TRACKING
    print(json.dumps(summary, default=str))  # one line: the stage's summary
    return 0


if __name__ == "__main__":
    sys.exit(main())
