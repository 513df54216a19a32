"""Evaluate stage: zero-shot classification and image-text retrieval of an exported model on a test split, and on
the standard benchmark sets of `evaluate.benchmarks` (benchmarks.py).

Writes `metrics.json` (flat, sorted keys: what DVC and MLflow read; the sets' metrics under `benchmark/<name>/`),
`per_class.json` (per-class recall, support and confusion matrix of every zero-shot task of the test split),
`benchmarks.json` (what each benchmark set is), PNG plots under `plots/` (per-class accuracy, confusion, retrieval
recall at k, an image-text similarity heatmap of a few test pairs, training curves) and `report.md` /
`report.html`, the stakeholder's view of all of it.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.caption_attributes import parse_caption, true_attributes
from lightclip_core.data.shards import (decode_caption, decode_image, decode_meta, decoded, describe_dataset,
                                        iter_raw_samples, read_manifest, shard_refs)
from lightclip_core.data.skips import DataError, SampleError, SkipTally
from lightclip_core.evaluate import plots
from lightclip_core.evaluate.benchmarks import BenchmarkSet, evaluate_benchmark, metric_prefix, open_benchmarks
from lightclip_core.evaluate.embedding import embed_images, embed_texts
from lightclip_core.evaluate.report import (ATTRIBUTE, ORACLE, RETRIEVAL_DEFINITIONS, STRICT, TEXT_EQUIVALENT,
                                            WISE_FT, ReportInputs, wise_ft_curves, write_report)
from lightclip_core.evaluate.retrieval import (attribute_consistent_retrieval, oracle_retrieval, recall_metrics,
                                               retrieval_metrics, text_equivalent_retrieval)
from lightclip_core.evaluate.zeroshot import ZERO_SHOT_KS, classification_metrics, headline_metrics
from lightclip_core.export.load import ExportedModel, load_exported
from lightclip_core.export.wise_ft import has_wise_ft, wise_ft_model
from lightclip_core.infra.storage import write_json_atomic
from lightclip_core.models.clip import zero_shot_weights

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.json"
BENCHMARKS_FILE = "benchmarks.json"  # what each benchmark set is (kind, format, path, classes, templates)
PLOTS_DIR = "plots"
SIMILARITY_PAIRS = 8
ORACLE_SEED = 0  # the attribute oracle's tie-break order: fixed, so that metrics.json is deterministic
Recalls = dict[str, dict[int, float]]  # direction -> k -> recall


@dataclass
class EvalResult:
    metrics: dict[str, float]
    metrics_path: Path
    per_class_path: Path
    plots: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, float] = field(default_factory=dict)  # SkipTally.metrics() of the test split's bad samples


@dataclass
class TestEmbeddings:
    """Embeddings of a test split: images in shard order, all their captions, and each task's class indices."""

    images: torch.Tensor  # [N, D]
    captions: torch.Tensor  # [M, D]
    caption_owner: torch.Tensor  # [M] index of the image each caption describes
    caption_texts: list[str]  # [M] the captions themselves
    labels: dict[str, torch.Tensor]  # task -> [N] class indices
    image_meta: list[dict[str, Any]] = field(default_factory=list)  # [N] each image's sample metadata
    skips: SkipTally = field(default_factory=SkipTally)  # the test samples skipped, and why


def select_tasks(manifest: dict[str, Any], requested: list[str] | None, test_dir: str | os.PathLike) -> dict:
    """The zero-shot tasks to run: all tasks of the manifest, or the requested ones, which must exist there."""
    available = manifest.get("tasks") or {}
    if requested is None:
        return dict(available)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ConfigError(f"evaluate.tasks: task {unknown[0]!r} is not in the test manifest of {str(test_dir)!r}; "
                         f"available: {sorted(available)}")
    return {name: available[name] for name in requested}


def _captions_of(raw: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    captions = meta.get("captions")
    if captions:
        return [str(c) for c in captions]
    return [decode_caption(raw)]


def _class_index(meta: dict[str, Any], key: str, task: str, spec: dict[str, Any], index: dict[str, int]) -> int:
    value = meta.get(spec["label_key"])
    if value not in index:
        raise SampleError("bad_metadata", f"test sample {key!r}: {spec['label_key']}={value!r} is not a class of "
                                          f"task {task!r}")
    return index[value]


@torch.inference_mode()
def embed_test_set(exported: ExportedModel, test_dir: str | os.PathLike, manifest: dict[str, Any],
                   tasks: dict[str, Any], batch_size: int) -> TestEmbeddings:
    """Embed every test image (batched) and every caption; read each task's labels from the sample metadata."""
    class_index = {task: {name: i for i, name in enumerate(spec["classes"])} for task, spec in tasks.items()}
    captions: list[str] = []
    owners: list[int] = []
    labels: dict[str, list[int]] = {task: [] for task in tasks}
    metas: list[dict[str, Any]] = []
    tally = SkipTally()

    def decode(raw: dict[str, Any]) -> tuple[dict[str, Any], Any, list[str], dict[str, int]]:
        meta = decode_meta(raw)
        sample_labels = {task: _class_index(meta, raw["__key__"], task, spec, class_index[task])
                         for task, spec in tasks.items()}
        return meta, decode_image(raw), _captions_of(raw, meta), sample_labels

    def images() -> Iterator[Any]:  # each test image, its metadata, captions and labels recorded on the way
        samples = decoded(iter_raw_samples(shard_refs(test_dir, manifest), tally), decode, tally)
        for n, (meta, image, sample_captions, sample_labels) in enumerate(samples):
            metas.append(meta)
            captions.extend(sample_captions)
            owners.extend([n] * len(sample_captions))
            for task in tasks:
                labels[task].append(sample_labels[task])
            yield image

    image_emb = embed_images(exported, images(), batch_size)
    if not len(image_emb):
        if tally.seen:
            raise DataError(f"test split {str(test_dir)!r}: no usable sample, {tally.total_skipped} of {tally.seen} "
                            f"skipped ({tally.describe()})")
        raise ValueError(f"test split {str(test_dir)!r} has no samples")
    return TestEmbeddings(images=image_emb, captions=embed_texts(exported, captions, batch_size),
                          caption_owner=torch.tensor(owners), caption_texts=captions,
                          labels={t: torch.tensor(v) for t, v in labels.items()}, image_meta=metas, skips=tally)


def run_zero_shot(exported: ExportedModel, emb: TestEmbeddings, task: str, spec: dict[str, Any],
                  templates: list[str], batch_size: int) -> dict[str, Any]:
    weights = zero_shot_weights(exported.model, spec["classes"], templates, exported.tokenize, batch_size)
    logits = emb.images @ weights.cpu()
    return classification_metrics(logits, emb.labels[task], len(spec["classes"]), ks=ZERO_SHOT_KS)


def zero_shot_results(cfg: Config, exported: ExportedModel, emb: TestEmbeddings, tasks: dict[str, Any]
                      ) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Every task's templates (its own, else evaluate.templates) and classification results."""
    out = {}
    for task, spec in tasks.items():
        templates = list(spec.get("templates") or cfg.evaluate.templates)
        out[task] = templates, run_zero_shot(exported, emb, task, spec, templates, cfg.evaluate.batch_size)
    return out


def zero_shot_metrics(results: dict[str, tuple[list[str], dict[str, Any]]]) -> dict[str, float]:
    return {f"zeroshot/{task}/{name}": value for task, (_, result) in results.items()
            for name, value in headline_metrics(result).items()}


@torch.inference_mode()
def similarity_pairs(exported: ExportedModel, test_dir: str | os.PathLike, manifest: dict[str, Any],
                     count: int) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """The first `count` test images, the first caption of each, and their cosine similarity [caption, image]."""
    model, device = exported.model, next(exported.model.parameters()).device
    images, captions = [], []
    tally = SkipTally()  # the same samples embed_test_set counted
    for image, caption in decoded(iter_raw_samples(shard_refs(test_dir, manifest), tally),
                                  lambda raw: (decode_image(raw), _captions_of(raw, decode_meta(raw))[0]), tally):
        images.append(image)
        captions.append(caption)
        if len(images) == count:
            break
    image_emb = model.encode_image(torch.stack([exported.preprocess(im) for im in images]).to(device)).cpu()
    text_emb = model.encode_text(exported.tokenize(captions).to(device)).cpu()
    return [np.asarray(im) for im in images], captions, (text_emb @ image_emb.T).numpy()


def attribute_recalls(emb: TestEmbeddings, ks: list[int]) -> dict[str, Recalls]:
    """Attribute-consistent recall of the model and the attribute oracle's strict recall (metric prefix -> recalls),
    from the images' synthetic attributes and the attributes their captions name."""
    images = [true_attributes(meta).codes() for meta in emb.image_meta]
    texts = [parse_caption(text).codes() for text in emb.caption_texts]
    return {ATTRIBUTE: attribute_consistent_retrieval(emb.images, emb.captions, emb.caption_owner, images, texts, ks),
            ORACLE: oracle_retrieval(emb.caption_owner, images, texts, ks, seed=ORACLE_SEED)}


def retrieval_recalls(emb: TestEmbeddings, manifest: dict[str, Any], ks: list[int]) -> dict[str, Recalls]:
    """Recall at k by every retrieval definition that applies to the test split (metric prefix -> recalls): strict
    and text-equivalent always; attribute-consistent and the attribute oracle on a synthetic split."""
    recalls = {STRICT: retrieval_metrics(emb.images, emb.captions, emb.caption_owner, ks),
               TEXT_EQUIVALENT: text_equivalent_retrieval(emb.images, emb.captions, emb.caption_texts,
                                                          emb.caption_owner, ks)}
    if describe_dataset(manifest)["source"] == "synthetic":
        recalls.update(attribute_recalls(emb, ks))
    return recalls


def training_summary(train_log: str | os.PathLike) -> dict[str, float]:
    """Steps and final loss (mean of the last 20 steps, as the trainer reports it) from `train_log.csv`."""
    log_columns = plots.read_train_log(train_log)
    return {"steps": float(log_columns["step"][-1]), "final_loss": float(np.nanmean(log_columns["loss"][-20:]))}


def _file_stem(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def plot_files(tasks: list[str]) -> dict[str, str]:
    """Plot name -> path relative to the evaluation directory (what `evaluate` writes; the report links them)."""
    files: dict[str, str] = {}
    for task in tasks:
        stem = _file_stem(task)
        files[f"{task}/per_class"] = f"{PLOTS_DIR}/zeroshot_{stem}_per_class.png"
        files[f"{task}/confusion"] = f"{PLOTS_DIR}/zeroshot_{stem}_confusion.png"
    files.update({"retrieval": f"{PLOTS_DIR}/retrieval_recall.png",
                  "similarity": f"{PLOTS_DIR}/similarity_heatmap.png",
                  "training_curves": f"{PLOTS_DIR}/training_curves.png", "wise_ft": f"{PLOTS_DIR}/wise_ft.png"})
    return files


def run_benchmarks(cfg: Config, exported: ExportedModel, benchmarks: list[BenchmarkSet]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Every benchmark set's metrics, and its skipped samples (`benchmark/<name>/skipped/...`)."""
    metrics: dict[str, float] = {}
    skipped: dict[str, float] = {}
    for bench in benchmarks:
        result, tally = evaluate_benchmark(exported, bench, cfg.evaluate.recall_at, cfg.evaluate.batch_size,
                                           cfg.data.max_skip_fraction)
        metrics.update(result)
        skipped.update({metric_prefix(bench.spec.name) + key: value for key, value in tally.metrics().items()})
    return metrics, skipped


def check_wise_ft(cfg: Config, export_dir: str | os.PathLike) -> None:
    """A WiSE-FT curve needs an export that keeps both endpoints (a run started from weights)."""
    if cfg.evaluate.wise_ft_alphas and not has_wise_ft(export_dir):
        raise ConfigError(f"evaluate.wise_ft_alphas={cfg.evaluate.wise_ft_alphas}: the export {str(export_dir)!r} "
                          "has no WiSE-FT endpoints; its run did not start from weights (model.init_from)")


def wise_ft_curve(cfg: Config, export_dir: str | os.PathLike, test_dir: str | os.PathLike, manifest: dict[str, Any],
                  tasks: dict[str, Any], benchmarks: list[BenchmarkSet], device: str | torch.device,
                  exported_alpha: float, exported_metrics: dict[str, float]) -> dict[str, float]:
    """WiSE-FT: the test split's and every benchmark set's metrics of the weights (1 - a) * start + a * fine-tuned
    at every a of `evaluate.wise_ft_alphas`, under `wise_ft/<a>/`. At the exported alpha the model is the exported
    one (wise_ft_model rebuilds it bit for bit), whose `exported_metrics` are reused."""
    out: dict[str, float] = {}
    for alpha in cfg.evaluate.wise_ft_alphas:
        if alpha == exported_alpha:
            values = exported_metrics
        else:
            model = wise_ft_model(export_dir, alpha, device)
            emb = embed_test_set(model, test_dir, manifest, tasks, cfg.evaluate.batch_size)
            values = {**zero_shot_metrics(zero_shot_results(cfg, model, emb, tasks)),
                      **recall_metrics(retrieval_recalls(emb, manifest, cfg.evaluate.recall_at)),
                      **run_benchmarks(cfg, model, benchmarks)[0]}
        out.update({f"{WISE_FT}/{alpha:g}/{key}": value for key, value in values.items()})
    return out


def evaluate(cfg: Config, export_dir: str | os.PathLike, test_dir: str | os.PathLike, out_dir: str | os.PathLike,
             train_log: str | os.PathLike | None = None, device: str | torch.device | None = None,
             benchmarks: list[BenchmarkSet] | None = None) -> EvalResult:
    """Evaluate the exported model on the test split and on the benchmark sets (`benchmarks`, opened by the
    caller; default: `evaluate.benchmarks` at local paths); see the module docstring for what is written."""
    out_dir = Path(out_dir)
    manifest = read_manifest(test_dir)
    tasks = select_tasks(manifest, cfg.evaluate.tasks, test_dir)  # fail on a bad task before any work
    if benchmarks is None:  # a missing or malformed set fails here, before the model is loaded
        benchmarks = open_benchmarks(cfg.evaluate.benchmarks, cfg.evaluate.templates)
    files = {name: out_dir / rel for name, rel in plot_files(list(tasks)).items()}
    if train_log is not None and not Path(train_log).is_file():
        raise FileNotFoundError(f"training log {str(train_log)!r} does not exist")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_wise_ft(cfg, export_dir)
    exported = load_exported(export_dir, device=device)
    emb = embed_test_set(exported, test_dir, manifest, tasks, cfg.evaluate.batch_size)
    emb.skips.check(cfg.data.max_skip_fraction, f"evaluate --data {test_dir}")  # before anything is written

    metrics: dict[str, float] = {"num_test_samples": len(emb.images)}
    per_class: dict[str, Any] = {}
    plot_paths: dict[str, Path] = {}
    zero_shot = zero_shot_results(cfg, exported, emb, tasks)
    metrics.update(zero_shot_metrics(zero_shot))
    for task, (templates, result) in zero_shot.items():
        classes = tasks[task]["classes"]
        per_class[task] = {"classes": list(classes), "recall": result["per_class_recall"],
                           "support": result["support"], "confusion": result["confusion"].tolist(),
                           "templates": templates}
        title = f"zero-shot {task}"
        plot_paths[f"{task}/per_class"] = plots.plot_per_class_accuracy(
            classes, result["per_class_recall"], f"{title}: per-class accuracy", files[f"{task}/per_class"])
        plot_paths[f"{task}/confusion"] = plots.plot_confusion_matrix(
            result["confusion"], classes, f"{title}: confusion", files[f"{task}/confusion"])

    recalls = retrieval_recalls(emb, manifest, cfg.evaluate.recall_at)
    metrics.update(recall_metrics(recalls))
    plot_paths["retrieval"] = plots.plot_retrieval_recall(
        {f"{direction}, {RETRIEVAL_DEFINITIONS[prefix]}": per_k for prefix, result in recalls.items()
         for direction, per_k in result.items()}, files["retrieval"])
    pair_images, pair_captions, similarity = similarity_pairs(exported, test_dir, manifest, SIMILARITY_PAIRS)
    plot_paths["similarity"] = plots.plot_similarity_heatmap(pair_images, pair_captions, similarity,
                                                             files["similarity"])
    bench_metrics, bench_skipped = run_benchmarks(cfg, exported, benchmarks)
    metrics.update(bench_metrics)
    if cfg.evaluate.wise_ft_alphas:
        exported_metrics = {key: value for key, value in metrics.items() if key != "num_test_samples"}
        metrics.update(wise_ft_curve(cfg, export_dir, test_dir, manifest, tasks, benchmarks, device,
                                     exported.config["wise_ft"]["alpha"], exported_metrics))
        plot_paths["wise_ft"] = plots.plot_wise_ft(wise_ft_curves(metrics), files["wise_ft"])
    described = {bench.spec.name: bench.describe() for bench in benchmarks}
    training: dict[str, float] = {}
    if train_log is not None:
        plot_paths["training_curves"] = plots.plot_training_curves(train_log, files["training_curves"])
        training = training_summary(train_log)

    write_json_atomic(out_dir / PER_CLASS_FILE, per_class)
    write_json_atomic(out_dir / BENCHMARKS_FILE, described)
    write_json_atomic(out_dir / METRICS_FILE, metrics)  # sorted keys: DVC diffs it
    report = write_report(ReportInputs(
        metrics=metrics, per_class=per_class, export_config=exported.config, test_data=describe_dataset(manifest),
        plots={name: str(path.relative_to(out_dir)) for name, path in plot_paths.items()}, training=training,
        benchmarks=described, wise_ft=wise_ft_curves(metrics)), out_dir, "LightCLIP evaluation report")
    log.info("evaluated %d test samples: %s", len(emb.images), metrics)
    return EvalResult(metrics=metrics, metrics_path=out_dir / METRICS_FILE, per_class_path=out_dir / PER_CLASS_FILE,
                      plots=plot_paths, report=report, skipped={**emb.skips.metrics(), **bench_skipped})
