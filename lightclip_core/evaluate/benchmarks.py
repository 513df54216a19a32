"""Standard benchmark sets in the evaluate stage: zero-shot classification and image-text retrieval on sets laid out
as CLIP_benchmark and the datasets themselves lay them out (`evaluate.benchmarks`; the formats are described in
:class:`lightclip_core.evaluate_config.BenchmarkSpec`).

:func:`open_benchmark` reads a set's layout (class names, templates, shard count, caption JSON) and refuses a missing
or malformed set with one line, before any model is loaded; :func:`evaluate_benchmark` then embeds its images and
texts. An image that does not decode, a sample without its label or captions, a cut shard: skipped, counted per
reason and held to `data.max_skip_fraction`, as in every stage that reads data.

Metrics, under `benchmark/<name>/`: `top1`, `top5`, `mean_per_class_recall` (classification), or recall at every k of
`evaluate.recall_at` by the strict and text-equivalent definitions (`retrieval/...`, `retrieval_text_equivalent/...`,
as the test split's), and `num_images` (plus `num_captions` for retrieval).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lightclip_core.config import BenchmarkSpec, ConfigError
from lightclip_core.data.ingest import IMAGE_SUFFIXES, class_directories, image_files
from lightclip_core.data.reader import decode_caption, decode_image, decoded, iter_raw_samples, open_image
from lightclip_core.data.skips import DataError, SampleError, SkipTally
from lightclip_core.evaluate.embedding import embed_images, embed_texts
from lightclip_core.evaluate.report import BENCHMARK, STRICT, TEXT_EQUIVALENT
from lightclip_core.evaluate.retrieval import recall_metrics, retrieval_metrics, text_equivalent_retrieval
from lightclip_core.evaluate.zeroshot import ZERO_SHOT_KS, classification_metrics, headline_metrics
from lightclip_core.evaluate_config import template_slot
from lightclip_core.export.load import ExportedModel
from lightclip_core.infra.storage import redact_uri
from lightclip_core.models.clip import zero_shot_weights

CLASSIFICATION, RETRIEVAL = "classification", "retrieval"
CLASSNAMES_FILE = "classnames.txt"  # CLIP_benchmark's metadata files
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
Localise = Callable[[str, str], Path]  # (uri, what: "file" | "dir") -> a local path (the stage fetches s3://)
Item = tuple[Image.Image, Any]  # an image and its class index (classification) or its captions (retrieval)


def metric_prefix(name: str) -> str:
    return f"{BENCHMARK}/{name}/"


@dataclass
class BenchmarkSet:
    """An opened set: its layout is checked; `items()` reads its images lazily and counts what it skips."""

    spec: BenchmarkSpec
    kind: str  # CLASSIFICATION | RETRIEVAL
    source: str  # the path as configured (for messages and the report)
    items: Callable[[SkipTally], Iterator[Item]]
    classes: list[str] | None = None
    templates: list[str] | None = None

    def describe(self) -> dict[str, Any]:
        """What the report and `benchmarks.json` say about the set."""
        out: dict[str, Any] = {"kind": self.kind, "format": self.spec.format, "path": redact_uri(self.source)}
        if self.classes is not None:
            out.update(classes=self.classes, templates=self.templates)
        return out


# ------------------------------------------------------------------------------------------------ helpers
def _where(spec: BenchmarkSpec, field: str = "path") -> str:
    return f"evaluate.benchmarks[{spec.name}].{field}={getattr(spec, field)!r}"


def _read_text(path: Path) -> str | None:
    """A metadata file's text; None when it is not there."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r}: not a readable UTF-8 text file ({err})") from None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _templates(spec: BenchmarkSpec, root: Path, default: list[str]) -> list[str]:
    """The set's templates: configured, else its templates file (CLIP_benchmark's `{c}` slot), else the default."""
    if spec.templates:
        return list(spec.templates)
    text = _read_text(root / TEMPLATES_FILE)
    templates = [template_slot(t) for t in _lines(text)] if text is not None else list(default)
    bad = next((t for t in templates if "{}" not in t), None)
    if bad is not None:
        raise ConfigError(f"{_where(spec)}: template {bad!r} of {TEMPLATES_FILE} has no {{c}} slot")
    return templates


def _open_image(path: Path) -> Image.Image:
    """The image file fully decoded, in RGB; a SampleError when it is missing or does not decode."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SampleError("missing_image", f"{path}: {err}") from None
    return open_image(data, str(path))


def _counted(entries: Iterable[Any], load: Callable[[Any], Item], tally: SkipTally) -> Iterator[Item]:
    """`load(entry)` of every entry, each counted as seen; a refused one (SampleError) is skipped and counted."""
    for entry in entries:
        tally.seen += 1
        try:
            yield load(entry)
        except SampleError as err:
            tally.skip(err.reason, detail=str(err))


# ------------------------------------------------------------------------------------------------ formats
def _open_imagefolder(spec: BenchmarkSpec, root: Path, default_templates: list[str],
                      localise: Localise) -> BenchmarkSet:
    dirs = class_directories(root) if root.is_dir() else []
    if not dirs:
        raise ConfigError(f"{_where(spec)}: no class directories (expected <path>/<class>/*.jpg)")
    names_file = localise(spec.class_names, "file") if spec.class_names else root / CLASSNAMES_FILE
    text = _read_text(names_file)
    if spec.class_names and text is None:
        raise ConfigError(f"{_where(spec, 'class_names')}: the file does not exist")
    classes = _lines(text) if text is not None else [d.name.replace("_", " ") for d in dirs]
    if len(classes) != len(dirs):
        raise ConfigError(f"{_where(spec)}: {names_file.name} has {len(classes)} class names for {len(dirs)} class "
                          "directories")
    files = [(label, f) for label, d in enumerate(dirs) for f in image_files(d)]
    if not files:
        raise ConfigError(f"{_where(spec)}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class directories")
    items = lambda tally: _counted(files, lambda entry: (_open_image(entry[1]), entry[0]), tally)  # noqa: E731
    return BenchmarkSet(spec, CLASSIFICATION, spec.path, items, classes, _templates(spec, root, default_templates))


def _wds_shards(spec: BenchmarkSpec, root: Path) -> list[str]:
    split = root / spec.split
    text = _read_text(split / NSHARDS_FILE)
    if text is None:
        raise ConfigError(f"{_where(spec)}: no {spec.split}/{NSHARDS_FILE} (CLIP_benchmark's WebDataset layout: "
                          f"<path>/<split>/{NSHARDS_FILE} and 0.tar .. n-1.tar)")
    try:
        count = int(text.strip())
    except ValueError:
        raise ConfigError(f"{_where(spec)}: {spec.split}/{NSHARDS_FILE} holds {text.strip()[:40]!r}, not a number of "
                          "shards") from None
    shards = [split / f"{i}.tar" for i in range(count)]
    missing = [s.name for s in shards if not s.is_file()]
    if count < 1 or missing:
        raise ConfigError(f"{_where(spec)}: {spec.split}/{NSHARDS_FILE} says {count} shards; "
                          + (f"{missing[0]} is missing" if missing else "a set needs at least one"))
    return [str(s) for s in shards]


def _wds_label(raw: dict[str, Any], classes: list[str]) -> int:
    if "cls" not in raw:
        raise SampleError("bad_metadata", f"no cls member (members: {sorted(raw)})")
    try:
        label = int(bytes(raw["cls"]).decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError("bad_metadata", f"cls is not a class index: {bytes(raw['cls'])[:20]!r}") from None
    if not 0 <= label < len(classes):
        raise SampleError("bad_metadata", f"cls={label} is not one of the {len(classes)} classes")
    return label


def _wds_captions(raw: dict[str, Any]) -> list[str]:
    captions = _lines(decode_caption(raw))
    if not captions:
        raise SampleError("empty_caption", "txt holds no caption")
    return captions


def _open_wds(spec: BenchmarkSpec, root: Path, default_templates: list[str], localise: Localise) -> BenchmarkSet:
    if not root.is_dir():
        raise ConfigError(f"{_where(spec)}: not a directory (CLIP_benchmark's WebDataset layout)")
    kind = (_read_text(root / TYPE_FILE) or CLASSIFICATION).strip().lower()
    if kind not in (CLASSIFICATION, RETRIEVAL):
        raise ConfigError(f"{_where(spec)}: {TYPE_FILE} says {kind[:40]!r}; supported: {CLASSIFICATION}, {RETRIEVAL}")
    shards = _wds_shards(spec, root)
    if kind == RETRIEVAL:
        items = lambda tally: decoded(iter_raw_samples(shards, tally, require=("image", "caption")),  # noqa: E731
                                      lambda raw: (decode_image(raw), _wds_captions(raw)), tally)
        return BenchmarkSet(spec, RETRIEVAL, spec.path, items)
    text = _read_text(root / CLASSNAMES_FILE)
    classes = _lines(text) if text is not None else []
    if not classes:
        raise ConfigError(f"{_where(spec)}: a classification set needs {CLASSNAMES_FILE} (one class name per line)")
    items = lambda tally: decoded(iter_raw_samples(shards, tally, require=("image",)),  # noqa: E731
                                  lambda raw: (decode_image(raw), _wds_label(raw, classes)), tally)
    return BenchmarkSet(spec, CLASSIFICATION, spec.path, items, classes, _templates(spec, root, default_templates))


def _caption_json(spec: BenchmarkSpec, path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{_where(spec)}: the caption JSON does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{_where(spec)}: not a readable JSON file ({str(err)[:80]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ConfigError(f"{_where(spec)}: expected a JSON object with an 'images' list ({spec.format} format)")
    return doc


def _image_dir(spec: BenchmarkSpec, path: Path, localise: Localise) -> Path:
    images = localise(spec.images_dir, "dir") if spec.images_dir else path.parent
    if not images.is_dir():
        raise ConfigError(f"{_where(spec, 'images_dir' if spec.images_dir else 'path')}: the image folder "
                          f"{str(images)!r} is not a directory")
    return images


def _retrieval_entries(spec: BenchmarkSpec, pairs: list[tuple[Path, list[Any]]]) -> BenchmarkSet:
    if not pairs:
        raise ConfigError(f"{_where(spec)}: no images" + (f" in split {spec.split!r}" if spec.format == "karpathy"
                                                           else ""))

    def load(entry: tuple[Path, list[Any]]) -> Item:
        captions = [c.strip() for c in entry[1] if isinstance(c, str) and c.strip()]
        if not captions:
            raise SampleError("missing_caption", f"{entry[0].name}: no caption")
        return _open_image(entry[0]), captions
    return BenchmarkSet(spec, RETRIEVAL, spec.path, lambda tally: _counted(pairs, load, tally))


def _open_coco(spec: BenchmarkSpec, path: Path, default_templates: list[str], localise: Localise) -> BenchmarkSet:
    doc = _caption_json(spec, path)
    if not isinstance(doc.get("annotations"), list):
        raise ConfigError(f"{_where(spec)}: expected an 'annotations' list (COCO caption format)")
    images = _image_dir(spec, path, localise)
    captions: dict[Any, list[Any]] = {}
    for ann in doc["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
    pairs = [(images / str(im.get("file_name")), captions.get(im["id"], [])) for im in doc["images"]
             if isinstance(im, dict) and "id" in im]
    return _retrieval_entries(spec, pairs)


def _open_karpathy(spec: BenchmarkSpec, path: Path, default_templates: list[str],
                   localise: Localise) -> BenchmarkSet:
    doc = _caption_json(spec, path)
    images = _image_dir(spec, path, localise)
    entries = [im for im in doc["images"] if isinstance(im, dict)]
    pairs = [(images / str(im.get("filepath") or "") / str(im.get("filename")),
              [s.get("raw") for s in im.get("sentences") or [] if isinstance(s, dict)])
             for im in entries if im.get("split") == spec.split]
    if not pairs and entries:
        splits = sorted({str(im.get("split")) for im in entries})
        raise ConfigError(f"{_where(spec, 'split')}: no image of that split in {spec.path!r}; its splits: {splits}")
    return _retrieval_entries(spec, pairs)


OPENERS = {"imagefolder": _open_imagefolder, "wds": _open_wds, "coco": _open_coco, "karpathy": _open_karpathy}


def local_paths(uri: str, what: str) -> Path:
    """The default localiser: local paths only (the evaluate stage passes one that fetches `s3://`)."""
    return Path(uri)


def open_benchmark(spec: BenchmarkSpec, default_templates: list[str], localise: Localise = local_paths
                   ) -> BenchmarkSet:
    """The set `spec` names, its layout checked (ConfigError, one line, when it is missing or malformed)."""
    root = localise(spec.path, "file" if spec.format in ("coco", "karpathy") else "dir")
    if not root.exists():
        raise ConfigError(f"{_where(spec)}: does not exist")
    return OPENERS[spec.format](spec, root, list(default_templates), localise)


# ------------------------------------------------------------------------------------------------ evaluation
def _embed(exported: ExportedModel, items: Iterator[Item], batch_size: int) -> tuple[torch.Tensor, list[Any]]:
    """Embeddings of every item's image (batched, in order) and the items' targets."""
    targets: list[Any] = []

    def images() -> Iterator[Image.Image]:
        for image, target in items:
            targets.append(target)
            yield image
    return embed_images(exported, images(), batch_size), targets


def _classification(exported: ExportedModel, bench: BenchmarkSet, images: torch.Tensor, labels: list[int],
                    batch_size: int) -> dict[str, float]:
    weights = zero_shot_weights(exported.model, bench.classes, bench.templates, exported.tokenize, batch_size)
    return headline_metrics(classification_metrics(images @ weights.cpu(), torch.tensor(labels), len(bench.classes),
                                                   ZERO_SHOT_KS))


def _retrieval(exported: ExportedModel, images: torch.Tensor, captions: list[list[str]], ks: list[int],
               batch_size: int) -> dict[str, float]:
    texts = [c for per_image in captions for c in per_image]
    owner = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image])
    text_emb = embed_texts(exported, texts, batch_size)
    recalls = {STRICT: retrieval_metrics(images, text_emb, owner, ks),
               TEXT_EQUIVALENT: text_equivalent_retrieval(images, text_emb, texts, owner, ks)}
    return {**recall_metrics(recalls), "num_captions": float(len(texts))}


def evaluate_benchmark(exported: ExportedModel, bench: BenchmarkSet, recall_at: list[int], batch_size: int,
                       max_skip_fraction: float) -> tuple[dict[str, float], SkipTally]:
    """The set's metrics (keys under `benchmark/<name>/`) and the tally of its skipped samples; a DataError past
    `max_skip_fraction`."""
    tally = SkipTally()
    images, targets = _embed(exported, bench.items(tally), batch_size)
    where = f"evaluate.benchmarks[{bench.spec.name}] {bench.source}"
    tally.check(max_skip_fraction, where)
    if not len(images):
        raise DataError(f"{where}: no usable sample, {tally.total_skipped} of {tally.seen} skipped "
                        f"({tally.describe()})")
    if bench.kind == CLASSIFICATION:
        metrics = _classification(exported, bench, images, targets, batch_size)
    else:
        metrics = _retrieval(exported, images, targets, recall_at, batch_size)
    metrics["num_images"] = float(len(images))
    prefix = metric_prefix(bench.spec.name)
    return {prefix + key: value for key, value in metrics.items()}, tally


def open_benchmarks(specs: list[BenchmarkSpec], default_templates: list[str], localise: Localise = local_paths
                    ) -> list[BenchmarkSet]:
    """Every configured set, opened and checked in order (the first bad one stops the stage)."""
    return [open_benchmark(spec, default_templates, localise) for spec in specs]
