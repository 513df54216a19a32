"""The reinforce stage between `s3://` prefixes of a real S3 API server (moto on 127.0.0.1): two range workers that do
not publish, then one join that does; the result is the local reinforcement of the same split, byte for byte; a
rerun skips every intact shard and redoes one whose object changed."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from test_reinforce import (TINY, base, config,  # noqa: F401  (the module-scoped split, teachers and local run)
                            reinforced)

from lightclip_core.data.reinforced import decode_reinforcement
from lightclip_core.data.shards import iter_raw_samples, read_manifest, shard_paths
from lightclip_core.data.skips import DataError
from lightclip_core.infra import storage
from lightclip_core.reinforce.reinforcement import publish_reinforced, reinforce

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bucket(s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    name = f"reinforce-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


def _samples(paths: list[str]) -> dict[str, tuple]:
    out = {}
    for raw in iter_raw_samples(paths):
        r = decode_reinforcement(raw)
        out[raw["__key__"]] = (r.image_emb, r.text_emb, r.syn_text_emb, r.param_aug, r.syn_texts, raw["png"])
    return out


def test_a_fan_out_on_s3_equals_the_local_reinforcement_and_a_rerun_skips_every_shard(base, reinforced, bucket,
                                                                                     tmp_path):
    cfg, teacher = config(), base / "teacher"
    src, out = f"s3://{bucket}/data/train", f"s3://{bucket}/reinforced/train"
    storage.publish_dir(base / "data" / "train", src)
    cache = tmp_path / "cache"

    first = reinforce(cfg, src, out, teacher, shard_range=range(0, 2), cache_dir=cache, publish=False)
    assert (first.shards_written, first.complete) == (2, None)
    assert not storage.exists(storage.join(out, "manifest.json"))
    partial = publish_reinforced(cfg, src, out, teacher)  # a join before every worker is done: incomplete
    assert not partial["reinforcement"]["complete"] and partial["reinforcement"]["missing_shards"] == 1
    assert [s["url"] for s in partial["shards"]] == ["train-000000.tar", "train-000001.tar"]
    second = reinforce(cfg, src, out, teacher, shard_range=range(2, 3), cache_dir=cache, publish=False)
    assert second.shards_written == 1
    manifest = publish_reinforced(cfg, src, out, teacher)
    assert manifest["reinforcement"]["complete"] and storage.read_json(storage.join(out, "manifest.json")) == manifest
    assert not [p for p in cache.rglob("*.tar")]  # the scratch space held only the shards in flight

    local_dir, _ = reinforced
    assert manifest == read_manifest(local_dir)  # same shards (sha256), counts and reinforcement description
    downloaded = tmp_path / "downloaded"
    for s in manifest["shards"]:
        storage.download_file(storage.join(out, s["url"]), downloaded / s["url"])
        assert storage.sha256_file(downloaded / s["url"]) == s["sha256"]
    remote, local = _samples(shard_paths(downloaded, manifest)), _samples(shard_paths(local_dir))
    assert list(remote) == list(local) and len(remote) == 40
    for key, (image_emb, text_emb, syn_emb, params, syn_texts, png) in remote.items():
        l_image, l_text, l_syn, l_params, l_syn_texts, l_png = local[key]
        np.testing.assert_array_equal(image_emb, l_image)
        np.testing.assert_array_equal(text_emb, l_text)
        np.testing.assert_array_equal(syn_emb, l_syn)
        assert (params, syn_texts, png) == (l_params, l_syn_texts, l_png)

    other_teachers = config(teacher={"ensemble": [{"model": f"local-dir:{teacher / 'model'}", "logit_scale": 50.0}],
                                     "captioner": {"model": f"local-dir:{teacher / 'model'}"}})
    other_params = config(reinforce={**TINY["reinforce"], "num_captions": 1})
    for changed in (other_teachers, other_params):  # entries of other teachers or parameters do not count
        with pytest.raises(FileNotFoundError, match="is reinforced with the current parameters"):
            publish_reinforced(changed, src, out, teacher)

    again = reinforce(cfg, src, out, teacher, cache_dir=cache)
    assert (again.shards_written, again.shards_reused, again.complete) == (0, 3, True)
    storage.write_bytes_atomic(storage.join(out, "train-000001.tar"), b"overwritten")  # no longer the recorded object
    redo = reinforce(cfg, src, out, teacher, cache_dir=cache)
    assert (redo.shards_written, redo.shards_reused, redo.complete) == (1, 2, True)
    assert storage.read_json(storage.join(out, "manifest.json")) == manifest


def test_a_join_without_reinforced_shards_and_a_changed_source_shard_are_errors(base, bucket, tmp_path):
    cfg, teacher = config(), base / "teacher"
    src, out = f"s3://{bucket}/data/train", f"s3://{bucket}/reinforced/train"
    storage.publish_dir(base / "data" / "train", src)
    with pytest.raises(FileNotFoundError, match="no shard of s3://.* is reinforced"):
        publish_reinforced(cfg, src, out, teacher)
    storage.write_bytes_atomic(storage.join(src, "train-000002.tar"), b"not the shard of the manifest")
    with pytest.raises(DataError, match="truncated_shard=8.*train-000002.tar"):  # its 8 samples lost: past the limit
        reinforce(cfg, src, out, teacher, shard_range=range(2, 3), cache_dir=tmp_path / "cache", publish=False)
    assert storage.list_files(out) == []
    with pytest.raises(FileNotFoundError, match="no manifest.json in s3://"):
        reinforce(cfg, f"s3://{bucket}/absent", out, teacher, cache_dir=tmp_path / "cache")
