"""The data stages: prepare the splits, train the embedded default's teachers, reinforce a split (whole, or one
group of a fan-out, then the join that publishes its manifest), index published reinforced shards."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightclip_core.config import Config
from lightclip_core.infra import storage
from lightclip_core.infra.sink import PrefixedSink
from lightclip_core.stages.io import (InputError, complete_dir, existing, local_dir, localise, output_dir,
                                      output_location, split_manifest, split_of)
from lightclip_core.tracking.mlflow_utils import StageRun

log = logging.getLogger(__name__)


@dataclass
class PrepareSummary:
    out: str
    counts: dict[str, int]
    skipped: dict[str, int]
    damaged_shards: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_prepare(*, cfg: Config, out: str | os.PathLike) -> PrepareSummary:
    """Generate or ingest the dataset into `out/{train,val,test}` (a local directory or an `s3://` prefix)."""
    from lightclip_core.data.prepare import prepare

    _check_prepare_output(out)
    storage.sweep_stale_tmp(out)
    with StageRun(cfg, "prepare") as run, output_dir(out, "prepare") as local:  # every manifest.json published last
        result = prepare(cfg.data, local)
        run.log_metrics({f"samples/{k}": v for k, v in result.counts.items()})
        run.log_metrics(result.skip_metrics)
    return PrepareSummary(str(out), result.counts, result.skipped, result.damaged_shards)


def _check_prepare_output(out: str | os.PathLike) -> None:
    """Before the run: a local `out` is new, or a previous output of prepare (nothing but split directories)."""
    from lightclip_core.data.prepare import check_replaceable

    output_location(out, "dataset directory")
    if not storage.is_s3(str(out)):
        try:
            check_replaceable(Path(out))
        except FileExistsError as err:
            raise InputError(f"--out={str(out)!r}: {err}") from None


@dataclass
class TeacherSummary:
    out: str
    models: list[str]
    metrics: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"models": [storage.join(self.out, m) for m in self.models], **self.metrics}


def run_teacher(*, cfg: Config, data: str | os.PathLike, out: str | os.PathLike,
                val: str | os.PathLike | None = None) -> TeacherSummary:
    """Train the embedded default's teachers (`teacher.train`, also the captioner, and `teacher.second` when set)
    on the training split `data` (a prepared root: its train/); each lands in `out/<name>/`, the metrics in
    `out/metrics.json`: training figures and each teacher's and the captioner's quality (`quality/<name>/...`) on the
    validation split `val` (default: the `val` split next to `data`, when there is one), which `reinforce`'s gate reads.
    """
    from lightclip_core.reinforce.coca_teacher import train_coca_teacher
    from lightclip_core.reinforce.quality import load_split
    from lightclip_core.reinforce.tower_pretrain import label_classes

    data = split_of(data, "train")
    _check_teacher_inputs(data, val, out)
    storage.sweep_stale_tmp(out)
    train_dir = local_dir(data, "training split", "data")
    val_dir = _validation_split(data, val)
    teachers = {"model": cfg.teacher.train, **({"second": cfg.teacher.second} if cfg.teacher.second else {})}
    for teacher in teachers.values():  # a split without the pretraining labels stops here, before any run
        if teacher.pretrain_steps:
            label_classes(train_dir, teacher.pretrain_labels, limit=1)
    metrics: dict[str, float] = {}
    # read (and held to data.max_skip_fraction) before any training, so a damaged split publishes nothing
    val_split = load_split(val_dir, max_skip_fraction=cfg.data.max_skip_fraction) if val_dir is not None else None
    with StageRun(cfg, "teacher", inputs={"data": train_dir}) as run, \
            output_dir(out, "teacher", last=("metrics.json",)) as local:
        for name, teacher in teachers.items():
            prefix = "" if name == "model" else f"{name}/"
            result = train_coca_teacher(teacher, train_dir, local, cfg.model.image.mean, cfg.model.image.std,
                                        sink=PrefixedSink(run, prefix), name=name,
                                        max_skip_fraction=cfg.data.max_skip_fraction)
            metrics.update({f"{prefix}{k}": v for k, v in result.metrics.items()})
            run.log_artifact(result.log_path)
        if val_split is not None:
            metrics.update(trained_teacher_quality(cfg, local, list(teachers), val_split))
        run.log_metrics({f"summary/{k}": v for k, v in metrics.items()})
        storage.write_json_atomic(local / "metrics.json", metrics)
    return TeacherSummary(str(out), list(teachers), metrics)


def _check_teacher_inputs(data: str | os.PathLike, val: str | os.PathLike | None, out: str | os.PathLike) -> None:
    """Before any download or run: the training split (and `val`, when given) is complete; `out` can be written."""
    complete_dir(data, "training split", "data")
    if val is not None:
        complete_dir(val, "validation split", "val")
    output_location(out, "teacher directory")


def _validation_split(data: str | os.PathLike, val: str | os.PathLike | None) -> Path | None:
    if val is not None:
        return local_dir(val, "validation split", "val")
    sibling = str(data).rstrip("/").rsplit("/", 1)[0] + "/val" if storage.is_s3(str(data)) else Path(data).parent / "val"
    if storage.exists(storage.join(sibling, "manifest.json")):
        return local_dir(sibling, "validation split", "val")
    log.warning("no validation split next to %s: the teachers' quality is not measured", data)
    return None


def trained_teacher_quality(cfg: Config, teacher_dir: Path, names: list[str], val_split: tuple) -> dict[str, float]:
    """`quality/<teacher>/...` for every trained teacher and `quality/captioner/...` for the trained captioner, on
    the validation split as `reinforce.quality.load_split` returns it."""
    from lightclip_core.config import TeacherSpec
    from lightclip_core.reinforce.captioner import Captioner
    from lightclip_core.reinforce.coca_teacher import trained_captioner
    from lightclip_core.reinforce.quality import caption_quality, teacher_quality
    from lightclip_core.reinforce.teachers import Teacher

    images, captions, metas, tasks = val_split
    out: dict[str, float] = {}
    for name in names:
        spec = TeacherSpec(model=f"local-dir:{teacher_dir / name}")
        figures = teacher_quality(Teacher(spec, teacher_dir, torch.device("cpu")), images, captions, metas, tasks,
                                  cfg.evaluate.templates)
        out.update({f"quality/{name}/{k}": v for k, v in figures.items()})
    captioner = trained_captioner(cfg.teacher.train.kind)
    if captioner is not None:
        spec = TeacherSpec(model=f"local-dir:{teacher_dir / captioner}")
        figures = caption_quality(Captioner(spec, teacher_dir), images, metas, cfg.reinforce)
        out.update({f"quality/captioner/{k}": v for k, v in figures.items()})
    return out


@dataclass
class ReinforceSummary:
    out: str
    complete: bool
    skipped: Any
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"out": self.out, "complete": self.complete, "skipped": self.skipped, **self.metrics}


def _teacher_dir(cfg: Config, teacher: str | os.PathLike | None) -> Path | None:
    """The trained teachers' directory, where the configuration uses them (an empty `teacher.ensemble` or no
    `teacher.captioner`); pretrained teachers alone need none."""
    needs_trained = not cfg.teacher.ensemble or cfg.teacher.captioner is None
    if not (needs_trained and teacher):
        return None
    return localise(teacher) if storage.is_s3(str(teacher)) else existing(teacher, "teacher directory", "teacher")


def run_reinforce(*, cfg: Config, data: str | os.PathLike, out: str | os.PathLike,
                  teacher: str | os.PathLike | None = None, shards: str | None = None,
                  publish: bool = True) -> ReinforceSummary:
    """Reinforce the split `data` (a prepared root: its train/) into `out` (either may be an `s3://` prefix): stored
    augmentations, synthetic captions, teacher embeddings. `shards` ("A:B") makes this one worker of a fan-out;
    `publish=False` leaves the manifest to :func:`run_publish_reinforced`."""
    from lightclip_core.data.shards import read_manifest
    from lightclip_core.reinforce.reinforcement import parse_shard_range, reinforce

    data = split_of(data, "train")
    _check_reinforce_inputs(data, out)
    storage.sweep_stale_tmp(out)
    data_dir = str(data) if storage.is_s3(str(data)) else existing(data, "split to reinforce", "data")
    teacher_dir = _teacher_dir(cfg, teacher)
    try:
        shard_range = parse_shard_range(shards, len(read_manifest(data_dir)["shards"]))
    except ValueError as err:
        raise InputError(str(err)) from None
    if teacher_dir is not None:
        _check_teacher_gate(cfg, teacher_dir)
    inputs = {"data": data_dir, **({"teacher": teacher_dir} if teacher_dir else {})}
    with StageRun(cfg, "reinforce", inputs=inputs) as run:
        result = reinforce(cfg, data_dir, out, teacher_dir, shard_range, sink=run, publish=publish)
        run.log_metrics({f"summary/{k}": v for k, v in result.metrics.items()})
    if not storage.is_s3(str(out)):
        storage.write_json_atomic(Path(out).parent / f"{Path(out).name}-metrics.json", result.metrics)
    return ReinforceSummary(str(result.out_dir), result.complete, result.skipped, result.metrics)


def _check_reinforce_inputs(data: str | os.PathLike, out: str | os.PathLike) -> None:
    """Before the run: the split to reinforce is complete and readable; a local `out` can be written."""
    complete_dir(data, "split to reinforce", "data")
    split_manifest(data, "split to reinforce", "data")
    output_location(out, "reinforced split")


def _check_teacher_gate(cfg: Config, teacher_dir: Path) -> None:
    """`teacher.gate` on the quality the teacher stage recorded for the trained teachers in use (pretrained teachers
    from `teacher.ensemble` / `teacher.captioner` have no recorded quality and are not gated)."""
    from lightclip_core.reinforce.coca_teacher import trained_captioner
    from lightclip_core.reinforce.quality import check_gate, recorded_quality

    metrics_file = teacher_dir / "metrics.json"
    metrics = storage.read_json(metrics_file) if metrics_file.exists() else {}
    trained = [] if cfg.teacher.ensemble else ["model", *(["second"] if cfg.teacher.second else [])]
    has_captioner = cfg.teacher.captioner is None and trained_captioner(cfg.teacher.train.kind) is not None
    quality = recorded_quality(metrics, trained, has_captioner)
    check_gate(quality, cfg.teacher.gate)


@dataclass
class PublishSummary:
    out: str
    complete: bool | None
    shards: int
    missing_shards: Any

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_publish_reinforced(*, cfg: Config, data: str | os.PathLike, out: str | os.PathLike,
                           teacher: str | os.PathLike | None = None) -> PublishSummary:
    """The join after a fan-out of `run_reinforce(publish=False)` workers: publish `out`'s manifest once."""
    from lightclip_core.reinforce.reinforcement import publish_reinforced

    complete_dir(data, "source split", "data")
    storage.sweep_stale_tmp(out)
    teacher_dir = localise(teacher) if teacher and storage.is_s3(str(teacher)) else teacher
    manifest = publish_reinforced(cfg, str(data), str(out), teacher_dir)
    reinforcement = manifest.get("reinforcement", {})
    return PublishSummary(str(out), reinforcement.get("complete"), len(manifest["shards"]),
                          reinforcement.get("missing_shards"))


@dataclass
class IndexSummary:
    manifest: str
    num_samples: int
    shards: int

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_index_reinforced(*, data: str | os.PathLike, dims: list[int], scales: list[float], image_size: int,
                         split: str = "train") -> IndexSummary:
    """Write the manifest of published reinforced shards (DataCompDR layout) found in `data`."""
    from lightclip_core.reinforce.published import index_reinforced

    data_dir = existing(data, "directory of reinforced shards", "data")
    storage.sweep_stale_tmp(data_dir)
    try:
        manifest = index_reinforced(data_dir, dims, scales, image_size, split=split)
    except ValueError as err:
        if type(err) is not ValueError:
            raise
        raise InputError(str(err)) from None
    return IndexSummary(str(data_dir / "manifest.json"), manifest["num_samples"], len(manifest["shards"]))
