"""The command line with `s3://` inputs and outputs, as a TrainJob's pods run it: `lightclip train --data s3://...
--out s3://...` reads the shards from object storage and publishes the run there (final.pt last); a missing prefix
is one line and exit code 2, before any work. Against a real S3 API (moto) on 127.0.0.1."""
from __future__ import annotations

import boto3
import pytest
import torch
import yaml
from helpers_tiny import TINY, merge

from lightclip_core.cli import main
from lightclip_core.config import validate
from lightclip_core.data.prepare import prepare
from lightclip_core.infra import storage
from lightclip_core.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bucket(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="runs")
    return client


@pytest.fixture
def params(tmp_path):
    raw = merge(TINY, {"objectives": {"distill": {"enabled": False}}, "tracking": {"enabled": False},
                       "train": {"threads": 1, "max_steps": 3}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, validate(raw)


def test_train_reads_shards_from_s3_and_publishes_the_run_there(bucket, params, tmp_path, capsys):
    path, cfg = params
    prepare(cfg.data, tmp_path / "data")
    storage.publish_dir(tmp_path / "data" / "train", "s3://runs/data/train")

    code = main(["train", "--params", str(path), "--data", "s3://runs/data/train", "--out", "s3://runs/r1/train"])
    assert code == 0, capsys.readouterr().err
    published = storage.list_files("s3://runs/r1/train")
    assert {"final.pt", "final.pt.sha256", "metrics.json", "train_log.csv"} <= set(published)
    storage.download_file("s3://runs/r1/train/final.pt", tmp_path / "final.pt")
    assert load_checkpoint(tmp_path / "final.pt")["step"] == 3
    assert storage.read_json("s3://runs/r1/train/metrics.json")["steps"] == 3.0

    # the same run from local files gives the same weights: S3 only moves bytes
    assert main(["train", "--params", str(path), "--data", str(tmp_path / "data" / "train"),
                 "--out", str(tmp_path / "local")]) == 0
    remote, local = load_checkpoint(tmp_path / "final.pt")["model"], load_checkpoint(tmp_path / "local" / "final.pt")
    assert all(torch.equal(remote[k], local["model"][k]) for k in remote)


def test_a_missing_s3_split_is_one_line_before_any_work(bucket, params, capsys):
    path, _ = params
    code = main(["train", "--params", str(path), "--data", "s3://runs/nothing/here", "--out", "s3://runs/r2/train"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--data='s3://runs/nothing/here'" in err
    assert storage.list_files("s3://runs/r2/") == []
