"""Ingestion of WebDataset tars, COCO caption JSON and ImageFolder trees, with bad samples and the skip limit."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from lightclip_core.config import DataConfig
from lightclip_core.data.ingest import DataError, assign_split
from lightclip_core.data.prepare import prepare
from lightclip_core.data.shards import iter_raw_samples, read_manifest, shard_paths, verify_shards

SPLITS = ("train", "val", "test")


def encoded(fmt: str, colour: tuple[int, int, int] = (200, 30, 30), size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    return encoded("JPEG", size=64)[:300]


NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n" + b"this is not a png body" * 4


def config(source: str, path: Path, max_skip: float = 0.5, **ingest: Any) -> DataConfig:
    fields = {"path": str(path), "val_fraction": 0.3, "test_fraction": 0.3, **ingest}
    return DataConfig(source=source, samples_per_shard=3, max_skip_fraction=max_skip, ingest=fields)


def read_all(out: Path) -> dict[str, dict[str, Any]]:
    """key -> raw sample (with its split under "split") over the three splits, after verifying each."""
    found: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        verify_shards(out / split)
        for raw in iter_raw_samples(shard_paths(out / split)):
            found[raw["__key__"]] = {**raw, "split": split, "meta": json.loads(raw["json"])}
    return found


def assert_split_by_hash(samples: dict[str, dict[str, Any]], identity_of=lambda key: key) -> None:
    for key, raw in samples.items():
        assert raw["split"] == assign_split(identity_of(key), 0.3, 0.3), key


def assert_nothing_published(root: Path) -> None:
    assert not list(root.rglob("manifest.json"))
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary directories left behind"


# ---------------------------------------------------------------------------------------------- webdataset
@pytest.fixture()
def tar_dir(tmp_path: Path) -> Path:
    """Two img2dataset-style shards plus the parquet and stats files img2dataset writes beside them."""
    root = tmp_path / "wds"
    root.mkdir()
    shards = [
        [{"__key__": "000000000", "jpg": encoded("JPEG"), "txt": "a red square", "json": {"url": "http://x/0"}},
         {"__key__": "000000001", "jpg": encoded("PNG"), "txt": "  png bytes named jpg  "},
         {"__key__": "000000002", "jpg": NOT_AN_IMAGE, "txt": "corrupt image"},
         {"__key__": "000000003", "jpg": encoded("JPEG"), "txt": "  \n\t"},
         {"__key__": "000000004", "webp": encoded("WEBP"), "txt": "a webp image", "json": {"caption": "orig"}}],
        [{"__key__": "000010000", "jpg": encoded("JPEG", (0, 0, 255)), "txt": "a blue square"},
         {"__key__": "000010001", "jpg": truncated_jpeg(), "txt": "truncated"},
         {"__key__": "000010002", "png": encoded("PNG"), "txt": "another"},
         {"__key__": "000010003", "jpg": encoded("JPEG")},
         {"__key__": "000010004", "jpg": encoded("JPEG"), "txt": "last one"}],
    ]
    for i, samples in enumerate(shards):
        with wds.TarWriter(str(root / f"{i:05d}.tar")) as sink:
            for s in samples:
                sink.write(s)
        (root / f"{i:05d}.parquet").write_bytes(b"PAR1 not a tar")
        (root / f"{i:05d}_stats.json").write_text(json.dumps({"successes": len(samples)}))
    return root


def test_webdataset_counts_skips_and_keeps_bytes(tar_dir: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    result = prepare(config("webdataset", tar_dir), tmp_path / "out")
    assert sum(result.counts.values()) == 6
    assert result.skipped == {"empty_caption": 1, "missing_caption": 1, "undecodable_image": 2}
    assert "skipped 4 of 10 samples" in caplog.text
    manifests = {split: read_manifest(result.out_dir / split) for split in SPLITS}
    assert sum(sum(m["skipped"].values()) for m in manifests.values()) == 4
    assert {split: m["num_samples"] for split, m in manifests.items()} == result.counts
    samples = read_all(result.out_dir)
    assert sorted(samples) == ["000000000", "000000001", "000000004", "000010000", "000010002", "000010004"]
    assert samples["000000000"]["jpg"] == encoded("JPEG")
    assert samples["000000001"]["png"] == encoded("PNG") and "jpg" not in samples["000000001"]
    assert samples["000000001"]["txt"] == b"png bytes named jpg"
    assert samples["000000004"]["webp"] == encoded("WEBP")
    assert samples["000000004"]["meta"] == {"caption": "orig", "captions": ["a webp image"]}
    assert samples["000000000"]["meta"]["url"] == "http://x/0"
    assert_split_by_hash(samples)


def test_webdataset_past_the_skip_limit_raises_and_publishes_nothing(tar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(config("webdataset", tar_dir, max_skip=0.3), out)
    message = str(err.value)
    assert "\n" not in message
    assert "0.4" in message and "data.max_skip_fraction=0.3" in message
    assert not out.exists()
    assert_nothing_published(tmp_path)


def test_failed_rerun_leaves_the_previous_output_intact(tar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare(config("webdataset", tar_dir), out)
    with pytest.raises(DataError):
        prepare(config("webdataset", tar_dir, max_skip=0.1), out)
    assert {s: read_manifest(out / s)["num_samples"] for s in SPLITS} == first.counts
    read_all(out)


def test_empty_tar_directory_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="no .tar shards"):
        prepare(config("webdataset", tmp_path / "in"), tmp_path / "out")


# --------------------------------------------------------------------------------------------------- coco
def write_coco(json_dir: Path, image_dir: Path) -> Path:
    image_dir.mkdir(parents=True, exist_ok=True)
    json_dir.mkdir(parents=True, exist_ok=True)
    files = {"a.jpg": encoded("JPEG"), "b.png": encoded("PNG"), "c.jpg": NOT_AN_IMAGE, "d.jpg": encoded("JPEG"),
             "f.jpg": encoded("JPEG"), "g.webp": encoded("WEBP")}
    for name, data in files.items():
        (image_dir / name).write_bytes(data)
    images = [{"id": i, "file_name": name} for i, name in
              enumerate(["a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.webp"], start=1)]
    captions = [(1, "A dog."), (1, "  "), (1, "A brown dog running."), (2, "A cat."), (3, "broken"), (4, ""),
                (4, "   "), (5, "file is missing"), (7, "one"), (7, "two"), (7, "three")]
    doc = {"images": images, "annotations": [{"id": n, "image_id": i, "caption": c}
                                             for n, (i, c) in enumerate(captions)]}
    path = json_dir / "captions.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_multi_captions_and_skips(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "ann", tmp_path / "images")
    cfg = config("coco", path, max_skip=0.6, images_dir=str(tmp_path / "images"))
    result = prepare(cfg, tmp_path / "out")
    assert result.skipped == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1, "undecodable_image": 1}
    samples = read_all(result.out_dir)
    assert sorted(samples) == ["1", "2", "7"]
    assert samples["1"]["meta"]["captions"] == ["A dog.", "A brown dog running."]
    assert samples["1"]["txt"] == b"A dog."
    assert samples["7"]["meta"]["captions"] == ["one", "two", "three"]
    assert samples["7"]["webp"] == encoded("WEBP")
    assert samples["2"]["meta"]["file_name"] == "b.png" and samples["2"]["png"] == encoded("PNG")
    assert_split_by_hash(samples)


def test_coco_images_default_to_the_json_directory(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "coco", tmp_path / "coco")
    result = prepare(config("coco", path, max_skip=0.6), tmp_path / "out")
    assert sum(result.counts.values()) == 3


def test_coco_past_the_skip_limit(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "coco", tmp_path / "coco")
    with pytest.raises(DataError, match=r"0\.5714.*data\.max_skip_fraction=0\.5"):
        prepare(config("coco", path, max_skip=0.5), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_coco_json_without_images_list_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="'images' and 'annotations'"):
        prepare(config("coco", path), tmp_path / "out")


# -------------------------------------------------------------------------------------------- imagefolder
@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    files = {"golden_retriever/1.jpg": encoded("JPEG"), "golden_retriever/2.png": encoded("PNG"),
             "golden_retriever/3.JPG": encoded("JPEG", (0, 90, 0)), "golden_retriever/bad.jpg": truncated_jpeg(),
             "golden_retriever/nested/4.webp": encoded("WEBP"), "tabby_cat/a.jpeg": encoded("JPEG", (9, 9, 9)),
             "tabby_cat/b.v2.png": encoded("PNG", (1, 2, 3)), "tabby_cat/notes.txt": b"not an image",
             "tabby_cat/.hidden.jpg": NOT_AN_IMAGE, ".cache/x.jpg": encoded("JPEG")}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_imagefolder_class_names_from_file(folder: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("golden retriever dog\ntabby cat\n\n")
    result = prepare(config("imagefolder", folder, class_names=str(names)), tmp_path / "out")
    assert result.skipped == {"undecodable_image": 1}
    samples = read_all(result.out_dir)
    assert sorted(samples) == ["golden_retriever/1", "golden_retriever/2", "golden_retriever/3",
                               "golden_retriever/nested/4", "tabby_cat/a", "tabby_cat/b_v2"]
    cat = samples["tabby_cat/a"]
    assert cat["meta"] == {"label": "tabby cat", "label_index": 1, "captions": ["a photo of a tabby cat."]}
    assert cat["txt"] == b"a photo of a tabby cat." and cat["jpg"] == encoded("JPEG", (9, 9, 9))
    assert samples["golden_retriever/3"]["meta"]["label"] == "golden retriever dog"
    assert samples["tabby_cat/b_v2"]["png"] == encoded("PNG", (1, 2, 3))
    for split in SPLITS:
        task = read_manifest(result.out_dir / split)["tasks"]["class"]
        assert task["label_key"] == "label" and task["classes"] == ["golden retriever dog", "tabby cat"]
        assert all("{}" in t for t in task["templates"])
    suffixes = {"golden_retriever/1": ".jpg", "golden_retriever/2": ".png", "golden_retriever/3": ".JPG",
                "golden_retriever/nested/4": ".webp", "tabby_cat/a": ".jpeg", "tabby_cat/b_v2": ".png"}
    originals = {"tabby_cat/b_v2": "tabby_cat/b.v2.png"}
    assert_split_by_hash(samples, lambda key: originals.get(key, key + suffixes[key]))


def test_imagefolder_class_names_from_directories(folder: Path, tmp_path: Path) -> None:
    result = prepare(config("imagefolder", folder), tmp_path / "out")
    task = read_manifest(result.out_dir / "train")["tasks"]["class"]
    assert task["classes"] == ["golden retriever", "tabby cat"]
    assert sum(result.counts.values()) == 6


def test_imagefolder_names_file_must_match_the_directories(folder: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\nthree\n")
    with pytest.raises(DataError, match="3 names but data.ingest.path has 2 class directories"):
        prepare(config("imagefolder", folder, class_names=str(names)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imagefolder_past_the_skip_limit(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"0\.1429 .*data\.max_skip_fraction=0\.1\b"):
        prepare(config("imagefolder", folder, max_skip=0.1), tmp_path / "out")
    assert_nothing_published(tmp_path)
