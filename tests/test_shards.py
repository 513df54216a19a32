"""Shard writer, manifest, verification and the shuffled, worker-split ShardStream."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightclip_core.data.shards import (ShardSetWriter, ShardStream, decode_image, decode_meta, iter_raw_samples,
                                        read_manifest, shard_paths, verify_shards)
from lightclip_core.data.synthetic import make_sample
from lightclip_core.infra.storage import sha256_file

NUM_SAMPLES = 57
PER_SHARD = 10


@pytest.fixture(scope="module")
def samples():
    return [make_sample(0, "train", i, 16, 0.2) for i in range(NUM_SAMPLES)]


@pytest.fixture()
def dataset(tmp_path: Path, samples) -> tuple[Path, dict[str, Any]]:
    writer = ShardSetWriter(tmp_path / "ds", "train", PER_SHARD)
    for s in samples:
        writer.write(s)
    manifest = writer.close({"seed": 0}, tasks={"t": {"label_key": "shape", "classes": ["circle"]}},
                            skipped={"empty_caption": 2})
    return tmp_path / "ds", manifest


def key_of(raw: dict[str, Any]) -> str:
    # top level, so DataLoader workers can pickle it; asserts that no empty boundary dict reaches decode
    assert raw.get("__key__"), f"sample without key: {sorted(raw)}"
    return raw["__key__"]


def stream_keys(urls: list[str], seed: int, epoch: int, workers: int = 0, buffer: int = 16) -> list[str]:
    stream = ShardStream(urls, key_of, seed=seed, shuffle_buffer=buffer)
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return list(loader)


def test_manifest_counts_and_hashes_match_the_files(dataset) -> None:
    out, manifest = dataset
    assert manifest == read_manifest(out)
    assert manifest["num_samples"] == NUM_SAMPLES
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 10, 10, 10, 7]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["url"] for s in manifest["shards"]]
    for shard in manifest["shards"]:
        assert sha256_file(out / shard["url"]) == shard["sha256"]
    assert manifest["skipped"] == {"empty_caption": 2} and manifest["params"] == {"seed": 0}
    assert not list(out.glob(".*")), "temporary files left behind"
    verify_shards(out)


def test_read_back_gives_the_written_samples(dataset, samples) -> None:
    out, _ = dataset
    raws = list(iter_raw_samples(shard_paths(out)))
    assert [r["__key__"] for r in raws] == [s.key for s in samples]
    for raw, s in zip(raws, samples, strict=True):
        assert raw["png"] == s.image
        assert raw["txt"].decode() == s.caption
        assert decode_meta(raw) == s.meta
        assert decode_image(raw).size == (16, 16)


def test_verify_detects_modified_and_missing_shards(dataset) -> None:
    out, manifest = dataset
    shard = out / manifest["shards"][2]["url"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        verify_shards(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError):
        verify_shards(out)


def test_stream_order_is_a_function_of_seed_and_epoch(dataset, samples) -> None:
    out, _ = dataset
    urls = shard_paths(out)
    first = stream_keys(urls, seed=1, epoch=0)
    assert first == stream_keys(urls, seed=1, epoch=0)
    assert sorted(first) == sorted(s.key for s in samples)
    assert first != stream_keys(urls, seed=1, epoch=1)
    assert first != stream_keys(urls, seed=2, epoch=0)
    assert first != sorted(first)


def test_unshuffled_stream_keeps_the_written_order(dataset, samples) -> None:
    out, _ = dataset
    stream = ShardStream(shard_paths(out), key_of, shuffle=False)
    assert list(stream) == [s.key for s in samples]


def test_two_workers_see_every_sample_exactly_once_in_a_reproducible_order(dataset) -> None:
    out, _ = dataset
    urls = shard_paths(out)
    keys = stream_keys(urls, seed=0, epoch=3, workers=2)
    assert len(keys) == NUM_SAMPLES and len(set(keys)) == NUM_SAMPLES
    assert keys == stream_keys(urls, seed=0, epoch=3, workers=2)


def test_meta_survives_json_round_trip(dataset) -> None:
    out, _ = dataset
    raw = next(iter_raw_samples(shard_paths(out)))
    assert json.loads(raw["json"])["captions"] == [raw["txt"].decode()]


def test_more_workers_than_shards_and_empty_splits(tmp_path: Path, samples) -> None:
    writer = ShardSetWriter(tmp_path / "one", "val", 100)
    for s in samples[:5]:
        writer.write(s)
    writer.close({})
    assert sorted(stream_keys(shard_paths(tmp_path / "one"), seed=0, epoch=0, workers=2)) == \
        sorted(s.key for s in samples[:5])
    empty = ShardSetWriter(tmp_path / "empty", "test", 100).close({})
    assert empty["num_samples"] == 0 and empty["shards"] == []
    assert list(iter_raw_samples(shard_paths(tmp_path / "empty"))) == []
