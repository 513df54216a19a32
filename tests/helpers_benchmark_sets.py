"""Benchmark sets written in the layouts the evaluate stage reads: CLIP_benchmark's WebDataset export (written with
webdataset's own ShardWriter, as CLIP_benchmark's `convert_dataset` writes it), class folders, COCO and Karpathy
caption JSON."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

CLASSES = ["red circle", "blue square", "green circle"]
TEMPLATES_C = ["a photo of a {c}.", "a drawing of the {c}."]  # CLIP_benchmark's slot
CAPTIONS = [["a red circle", "a round red thing"], ["a blue square"], ["a green circle", "a red circle"],
            ["a blue square", "a big blue square on grey", "blue"]]  # repeats across images, as real sets have
RGB = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}


def image(colour: str, shape: str, jitter: int) -> Image.Image:
    pixels = np.full((40, 40, 3), 235 - jitter, dtype=np.uint8)
    yy, xx = np.mgrid[:40, :40]
    inside = (xx - 20) ** 2 + (yy - 20) ** 2 < 150 if shape == "circle" else (abs(xx - 20) < 11) & (abs(yy - 20) < 11)
    pixels[inside] = RGB[colour]
    return Image.fromarray(pixels)


def encoded(im: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


LABELLED = [(image(*CLASSES[i % 3].split(), jitter=i), i % 3) for i in range(9)]  # image, class index
CAPTIONED = [(image(c, s, jitter=5 * i), CAPTIONS[i]) for i, (c, s) in
             enumerate([("red", "circle"), ("blue", "square"), ("green", "circle"), ("blue", "square")])]


# ----------------------------------------------------------------------------------- sets in their layouts
def write_wds(root: Path, samples: list[tuple[Image.Image, object]], *, retrieval: bool, maxcount: int = 4,
              split: str = "test") -> Path:
    """CLIP_benchmark's `convert_dataset`: `<root>/<split>/%d.tar` by ShardWriter, keys `s%07d`, the image as webp,
    `cls` (an int) or `txt` (captions joined by newlines), then `nshards.txt` and the metadata files."""
    (root / split).mkdir(parents=True)
    sink = wds.ShardWriter(str(root / split / "%d.tar"), maxcount=maxcount, verbose=0)
    for index, (im, target) in enumerate(samples):
        sample = {"__key__": "s%07d" % index, "webp": encoded(im, "webp")}
        sample.update({"txt": "\n".join(target)} if retrieval else {"cls": target})
        sink.write(sample)
    shards = sink.shard
    sink.close()
    (root / split / "nshards.txt").write_text(f"{shards}\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES_C) + "\n")
    return root


def write_imagefolder(root: Path) -> Path:
    for n, (im, label) in enumerate(LABELLED):
        folder = root / f"{label}_{CLASSES[label].replace(' ', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{n:03d}.png")
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES_C) + "\n")
    return root


def write_coco(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for n, (im, captions) in enumerate(CAPTIONED):
        im.save(root / "images" / f"{n:012d}.jpg", quality=95)
        images.append({"id": 100 + n, "file_name": f"{n:012d}.jpg"})
        annotations += [{"id": len(annotations), "image_id": 100 + n, "caption": c} for c in captions]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "captions.json"


def write_karpathy(root: Path) -> Path:
    (root / "flickr" / "imgs").mkdir(parents=True)
    entries = [{"filename": "train0.jpg", "split": "train", "sentences": [{"raw": "not read"}]}]
    for n, (im, captions) in enumerate(CAPTIONED):
        im.save(root / "flickr" / "imgs" / f"{n}.jpg", quality=95)
        entries.append({"filepath": "imgs", "filename": f"{n}.jpg", "split": "test",
                        "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
    (root / "dataset_flickr.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return root / "dataset_flickr.json"
