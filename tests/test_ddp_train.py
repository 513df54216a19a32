"""Data-parallel training under torchrun (2 CPU processes, gloo): the same parameters train the same model as one
process on the same global batch; a rank that dies or diverges fails the whole job fast, naming the rank and the
cause."""
from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from lightclip_core.config import Config
from lightclip_core.data.prepare import prepare
from lightclip_core.train.checkpoint import list_checkpoints, load_checkpoint
from lightclip_core.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
# Shards of 16 samples, no sample shuffling, global batch 32: one process reads shards i and i+1 of the epoch's order
# into a batch; with 2 ranks, rank 0 reads shard i and rank 1 shard i+1 (every other shard), so the global batch is
# the same samples in the same order. A model without batch statistics (ConvNeXt's LayerNorms, the transformer's):
# BatchNorm statistics would be computed per rank.
PARAMS = {
    "data": {"samples_per_shard": 16, "synthetic": {"num_train": 256, "num_val": 8, "num_test": 8, "image_size": 32}},
    "model": {"embed_dim": 32, "image": {"tower": "convnext_atto", "size": 32},
              "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 2}},
    "objectives": {"token": {"enabled": False}, "mlm": {"enabled": False}, "distill": {"enabled": False}},
    "train": {"batch_size": 32, "max_steps": 5, "warmup_steps": 2, "checkpoint_every": 3, "workers": 0,
              "shuffle_buffer": 0, "threads": 1},
    "tracking": {"enabled": False},
}


def params(tmp_path: Path, **train) -> Path:
    raw = copy.deepcopy(PARAMS)
    raw["train"].update(train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(Config.model_validate(PARAMS).data, out)
    return out / "train"


def torchrun(entry: list[str], args: list[str], **popen) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *entry, "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains_on_the_same_global_batch(data, tmp_path):
    single = train(Config.model_validate(yaml.safe_load(params(tmp_path).read_text())), data, tmp_path / "one")
    proc = torchrun(["-m", "lightclip_core.cli"], ["--params", str(params(tmp_path)), "--data", str(data),
                                                  "--out", str(tmp_path / "two")])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]

    one, two = read_log(single.train_log), read_log(tmp_path / "two" / "train_log.csv")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]  # rank 0 alone writes the log
    assert [r["samples_seen"] for r in two] == [32, 64, 96, 128, 160]  # global accounting
    for a, b in zip(one, two, strict=True):
        for term in ("loss", "contrastive_loss", "lr", "logit_scale"):
            # float rounding only (the reduction order differs); lr 0.002 carries it a little further than 0.001
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-5), (a["step"], term)
    w1 = load_checkpoint(single.final_checkpoint)["model"]
    w2 = load_checkpoint(tmp_path / "two" / "final.pt", require_checksum=True)["model"]
    assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) < 1e-5

    [ckpt] = list_checkpoints(tmp_path / "two" / "checkpoints")
    state = load_checkpoint(ckpt, require_checksum=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert [r["data"]["samples"] for r in state["ranks"]] == [48, 48]  # 3 steps of 16 samples per rank
    assert "samples consumed per rank [80, 80]" in output


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_fast_and_is_named(data, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(["-m", "lightclip_core.cli"], ["--params", str(params(tmp_path, max_steps=10_000)),
                                                  "--data", str(data), "--out", str(out)])
    try:
        deadline = time.monotonic() + 180
        while not (out / "train_log.csv").is_file() or len((out / "train_log.csv").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        [victim] = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if p.environ().get("RANK") == "1" and p.environ().get("LOCAL_RANK") == "1"]
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output, _ = proc.communicate(timeout=60)  # never hangs: torchrun stops the other rank
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and took < 60
    assert f"rank      : 1 (local_rank: 1)" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert not (out / "final.pt").exists()


POISON = '''\
import os, sys
from lightclip_core.losses.objective import TrainingLoss

real = TrainingLoss.forward


def forward(self, images, tokens, step, total_steps, extras=None):
    if os.environ["RANK"] == "1" and step == 2:  # rank 1 alone sees a NaN, in the third optimizer step
        images = images * float("nan")
    return real(self, images, tokens, step, total_steps, extras)


TrainingLoss.forward = forward
from lightclip_core.cli import main

sys.exit(main())
'''


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_step_and_keeps_the_last_checkpoint(data, tmp_path):
    script = tmp_path / "poisoned_cli.py"
    script.write_text(POISON)
    out = tmp_path / "run"
    proc = torchrun([str(script)], ["--params", str(params(tmp_path, accum_steps=2, checkpoint_every=2, max_steps=8)),
                                    "--data", str(data), "--out", str(out)])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "TrainingDiverged: loss is nan at step 3" in output, output[-3000:]
    assert output.count("loss is nan at step 3") >= 2  # both ranks stopped there (each one's error file)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002.pt"]
    assert not (out / "final.pt").exists()
    rows = read_log(out / "train_log.csv")
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
