"""The stages' one place for storage (lightclip_core/stages/io.py), against a real S3 API (moto) on 127.0.0.1: an
output prefix sees a stage's files only when the stage succeeded (their order, marker last, is publish_dir's and
tested in test_storage.py), and the work directory is removed either way; an input prefix without its completion marker is one line naming the flag, before any
work; the stage functions take the same locations as the command line."""
from __future__ import annotations

import boto3
import pytest
from helpers_tiny import TINY, merge

from lightclip_core.config import validate
from lightclip_core.infra import storage
from lightclip_core.stages import InputError, run_prepare
from lightclip_core.stages.io import local_dir, output_dir


@pytest.fixture
def bucket(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTCLIP_WORKDIR", str(tmp_path / "work"))
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="stages")
    return client


def keys(client, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket="stages", Prefix=prefix).get("Contents", []))


def test_an_s3_output_is_published_only_when_the_block_succeeds(bucket, tmp_path):
    with output_dir("s3://stages/ok", "unit", last=("done.json",)) as local:
        (local / "done.json").write_text("{}")
        (local / "sub").mkdir()
        (local / "sub" / "a.bin").write_bytes(b"a")
        assert keys(bucket, "ok/") == []  # nothing visible while the stage works
    assert keys(bucket, "ok/") == ["ok/done.json", "ok/sub/a.bin"]
    assert not local.exists()  # the work directory is gone after publication
    with pytest.raises(RuntimeError), output_dir("s3://stages/failed", "unit") as local:
        (local / "manifest.json").write_text("{}")
        raise RuntimeError("the stage failed")
    assert keys(bucket, "failed/") == [] and not local.exists()


def test_a_local_output_is_written_in_place(tmp_path):
    with output_dir(tmp_path / "out", "unit") as local:
        assert local == tmp_path / "out"


def test_an_s3_input_needs_its_completion_marker(bucket):
    bucket.put_object(Bucket="stages", Key="export/model.safetensors", Body=b"x")
    with pytest.raises(InputError, match=r"^--model='s3://stages/export': export directory has no config.json$"):
        local_dir("s3://stages/export", "export directory", "model", marker="config.json")
    bucket.put_object(Bucket="stages", Key="export/config.json", Body=b"{}")
    local = local_dir("s3://stages/export", "export directory", "model", marker="config.json")
    assert (local / "model.safetensors").read_bytes() == b"x" and (local / "config.json").is_file()


def test_prepare_publishes_every_split_to_s3_with_the_same_shards_as_a_local_run(bucket, tmp_path):
    cfg = validate(merge(TINY, {"tracking": {"enabled": False}}))
    remote = run_prepare(cfg=cfg, out="s3://stages/data")
    here = run_prepare(cfg=cfg, out=tmp_path / "data")
    assert remote.counts == here.counts
    for split in ("train", "val", "test"):
        local = sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data" / split).rglob("*")
                       if p.is_file())
        assert keys(bucket, f"data/{split}/") == [f"data/{name}" for name in local]
        manifest = storage.read_json(f"s3://stages/data/{split}/manifest.json")
        assert manifest["shards"] == storage.read_json(tmp_path / "data" / split / "manifest.json")["shards"]
    assert not list((tmp_path / "work" / "lightclip-work").iterdir())  # the work directory was removed
