"""Ingestion of real image-text data into the shard format: WebDataset tars, COCO-style caption JSON, ImageFolder.

Each source yields ``(split, Sample)`` pairs. Image bytes are kept as they were encoded (only formats that the
shard readers cannot open are converted, losslessly, to PNG); the extension follows the real format, not the
file name. A sample whose image does not decode fully, or that has no non-blank caption, is skipped and counted
per reason, as is a damaged tar (skips.py); :meth:`SkipTally.check` fails the run past ``data.max_skip_fraction``.
The split of a sample
is a hash of its source identity (tar key, image id, relative path), so it is stable across runs and seeds and
an image never moves between train and test when the data grows.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from lightclip_core.config import DEFAULT_TEMPLATES, DataConfig
from lightclip_core.data.shards import Sample, iter_raw_samples
from lightclip_core.data.skips import DataError, SkipTally  # DataError's old home: still importable from here

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_RAW_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# PIL format name -> shard extension. MPO is the multi-picture JPEG that cameras write: its bytes are a JPEG.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_MAX_KEY_CHARS = 80  # keeps "<key>.<ext>" inside the 100-byte name field of a USTAR tar header
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")
IMAGEFOLDER_CAPTION = "a photo of a {}."


# ------------------------------------------------------------------------------------------------- helpers
def assign_split(identity: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from a uniform number derived from sha256(identity)."""
    u = int.from_bytes(hashlib.sha256(identity.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def safe_key(identity: str) -> str:
    """A WebDataset key: no dots (webdataset splits the extension at the first dot) and a short tar name."""
    key = _UNSAFE_KEY_CHARS.sub("_", identity).strip("/") or "_"
    if len(key) > _MAX_KEY_CHARS:
        key = f"{key[:_MAX_KEY_CHARS - 17]}_{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    return key


class KeyRegistry:
    """Unique keys: two identities that sanitise to the same key get numbered suffixes."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def unique(self, identity: str) -> str:
        key = base = safe_key(identity)
        n = 1
        while key in self._seen:
            key = f"{base}_{n}"
            n += 1
        self._seen.add(key)
        return key


def checked_image(data: bytes) -> tuple[bytes, str] | None:
    """(bytes, extension) if the image decodes completely, else None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            ext = _KEPT_FORMATS.get(im.format or "")
            if ext:
                return data, ext
            buf = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
            return buf.getvalue(), "png"
    except Exception:  # PIL reports corrupt data with many exception types (OSError, SyntaxError, ValueError...)
        return None


def clean_caption(text: Any) -> str:
    return text.strip() if isinstance(text, str) else ""


@dataclass
class Source:
    """A source opened for ingestion. `samples` is lazy and fills `tally` as it goes."""

    name: str
    samples: Iterator[tuple[str, Sample]]
    tasks: dict[str, Any]
    tally: SkipTally
    total: int | None  # known in advance for the progress bar, when cheap to know


class _Router:
    """Assign splits, unique keys and skip reasons in one place for every source."""

    def __init__(self, cfg: DataConfig, tally: SkipTally):
        self.val_fraction = cfg.ingest.val_fraction
        self.test_fraction = cfg.ingest.test_fraction
        self.tally = tally
        self.keys = KeyRegistry()

    def admit(self, identity: str, count: bool = True) -> str:
        """Count one more input sample (unless its reader counted it) and return its split."""
        self.tally.seen += count
        return assign_split(identity, self.val_fraction, self.test_fraction)

    def sample(self, split: str, identity: str, image: bytes | None, captions: list[str],
               meta: dict[str, Any]) -> Sample | None:
        """The sample, or None after counting why it is skipped. Captions are checked first: they are cheap."""
        if not captions:
            self.tally.skip("empty_caption", split=split)
            return None
        if image is None:
            self.tally.skip("missing_image", split=split)
            return None
        checked = checked_image(image)
        if checked is None:
            self.tally.skip("undecodable_image", split=split, detail=f"{identity}: the image does not decode")
            return None
        data, ext = checked
        meta = {**meta, "captions": captions}
        return Sample(key=self.keys.unique(identity), image=data, image_ext=ext, caption=captions[0], meta=meta)


# --------------------------------------------------------------------------------------------- webdataset
def tar_files(path: Path) -> list[Path]:
    """The .tar shards of an img2dataset/DataComp output (parquet and stats files are ignored)."""
    if path.is_file():
        return [path] if path.suffix == ".tar" else []
    return sorted(p for p in path.rglob("*.tar") if p.is_file() and not p.name.startswith("."))


def _raw_caption(raw: dict[str, Any]) -> str | None:
    """The caption text; None when it is not UTF-8."""
    data = raw["txt"]
    try:
        return data.decode("utf-8") if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError:
        return None


def _raw_meta(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _webdataset_samples(files: list[Path], router: _Router) -> Iterator[tuple[str, Sample]]:
    # the reader counts every sample it finds (and the damage of a cut or garbled tar, whose lost samples have no
    # split); members are checked here, per split
    for raw in iter_raw_samples((str(f) for f in files), router.tally, require=()):
        identity = raw["__key__"]
        split = router.admit(identity, count=False)
        if "txt" not in raw:
            router.tally.skip("missing_caption", split=split)
            continue
        text = _raw_caption(raw)
        if text is None:
            router.tally.skip("undecodable_caption", split=split)
            continue
        caption = clean_caption(text)
        image = next((raw[k] for k in _RAW_IMAGE_KEYS if k in raw), None)
        sample = router.sample(split, identity, image, [caption] if caption else [], _raw_meta(raw))
        if sample is not None:
            yield split, sample


def open_webdataset(cfg: DataConfig) -> Source:
    path = Path(cfg.ingest.path)
    files = tar_files(path)
    if not files:
        raise DataError(f"data.ingest.path={str(path)!r}: no .tar shards found")
    tally = SkipTally()
    return Source(f"webdataset {path}", _webdataset_samples(files, _Router(cfg, tally)), {}, tally, None)


# --------------------------------------------------------------------------------------------------- coco
def _load_caption_json(path: Path) -> tuple[list[dict[str, Any]], dict[Any, list[Any]]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"data.ingest.path={str(path)!r}: not a readable JSON file ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise DataError(f"data.ingest.path={str(path)!r}: expected a JSON object with 'images' and 'annotations' "
                        "lists (COCO caption format)")
    captions: dict[Any, list[Any]] = defaultdict(list)
    for ann in doc["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            captions[ann["image_id"]].append(ann.get("caption"))
    return [im for im in doc["images"] if isinstance(im, dict) and "id" in im], captions


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _coco_samples(images: list[dict[str, Any]], captions_by_id: dict[Any, list[Any]], image_root: Path,
                  router: _Router) -> Iterator[tuple[str, Sample]]:
    dropped = 0
    for entry in images:
        identity = str(entry["id"])
        split = router.admit(identity)
        raw_captions = captions_by_id.get(entry["id"], [])
        captions = [c for c in (clean_caption(r) for r in raw_captions) if c]
        if not raw_captions:
            router.tally.skip("missing_caption", split=split)
            continue
        dropped += len(raw_captions) - len(captions) if captions else 0
        file_name = entry.get("file_name")
        image = _read_bytes(image_root / file_name) if captions and isinstance(file_name, str) else None
        meta = {"image_id": entry["id"], "file_name": file_name}
        sample = router.sample(split, identity, image, captions, meta)
        if sample is not None:
            yield split, sample
    if dropped:
        # blank captions of images that keep other captions are dropped, not skipped: the image is still used
        log.warning("dropped %d blank captions of images that have other captions", dropped)


def open_coco(cfg: DataConfig) -> Source:
    path = Path(cfg.ingest.path)
    images, captions = _load_caption_json(path)
    if not images:
        raise DataError(f"data.ingest.path={str(path)!r}: the 'images' list is empty")
    root = Path(cfg.ingest.images_dir) if cfg.ingest.images_dir else path.parent
    tally = SkipTally()
    return Source(f"coco {path}", _coco_samples(images, captions, root, _Router(cfg, tally)), {}, tally, len(images))


# -------------------------------------------------------------------------------------------- imagefolder
def class_directories(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def class_names(dirs: list[Path], names_file: str | None) -> list[str]:
    """Names from the file (one per line, in sorted directory order), else directory names with `_` -> space."""
    if not names_file:
        return [d.name.replace("_", " ") for d in dirs]
    names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
    if len(names) != len(dirs):
        raise DataError(f"data.ingest.class_names={names_file!r} has {len(names)} names but data.ingest.path has "
                        f"{len(dirs)} class directories")
    return names


def image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _imagefolder_samples(root: Path, files: list[tuple[int, Path]], names: list[str],
                         router: _Router) -> Iterator[tuple[str, Sample]]:
    for label_index, file in files:
        identity = file.relative_to(root).as_posix()
        split = router.admit(identity)
        name = names[label_index]
        meta = {"label": name, "label_index": label_index}
        key_identity = identity.rsplit(".", 1)[0]
        sample = router.sample(split, key_identity, _read_bytes(file), [IMAGEFOLDER_CAPTION.format(name)], meta)
        if sample is not None:
            yield split, sample


def open_imagefolder(cfg: DataConfig) -> Source:
    root = Path(cfg.ingest.path)
    dirs = class_directories(root) if root.is_dir() else []
    if not dirs:
        raise DataError(f"data.ingest.path={str(root)!r}: no class directories found (expected root/<class>/*.jpg)")
    names = class_names(dirs, cfg.ingest.class_names)
    files = [(i, f) for i, d in enumerate(dirs) for f in image_files(d)]
    tasks = {"class": {"label_key": "label", "classes": names, "templates": list(DEFAULT_TEMPLATES)}}
    tally = SkipTally()
    samples = _imagefolder_samples(root, files, names, _Router(cfg, tally))
    return Source(f"imagefolder {root}", samples, tasks, tally, len(files))


OPENERS = {"webdataset": open_webdataset, "coco": open_coco, "imagefolder": open_imagefolder}


def open_source(cfg: DataConfig) -> Source:
    """The ingestion source named by `cfg.source` (one of webdataset, coco, imagefolder)."""
    if cfg.source not in OPENERS:
        raise ValueError(f"data.source={cfg.source!r} is not an ingestion source; allowed: {sorted(OPENERS)}")
    return OPENERS[cfg.source](cfg)
