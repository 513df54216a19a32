"""The trainer: deterministic for a seed, checkpoints readable with weights_only, schedule, divergence stop."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from lightclip_core.config import Config
from lightclip_core.data.prepare import prepare
from lightclip_core.train.checkpoint import list_checkpoints, load_checkpoint
from lightclip_core.train.schedule import warmup_cosine
from lightclip_core.train.trainer import TrainingDiverged, plan_steps, train

TINY = {
    "data": {"samples_per_shard": 64, "synthetic": {"num_train": 256, "num_val": 8, "num_test": 8, "image_size": 32}},
    "model": {"embed_dim": 32, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 2}},
    "objectives": {"mlm": {"fusion": [{"text_layer": 0, "image_stride": 8}, {"text_layer": 1, "image_stride": 32}]},
                   "distill": {"enabled": False}},
    "train": {"batch_size": 32, "max_steps": 8, "warmup_steps": 2, "checkpoint_every": 3, "keep_checkpoints": 2,
              "workers": 0, "shuffle_buffer": 64, "threads": 1},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = Config.model_validate(TINY)
    data = tmp_path_factory.mktemp("data")
    prepare(cfg.data, data)
    return cfg, data / "train"


def test_same_seed_gives_bit_identical_weights(tiny, tmp_path):
    cfg, train_dir = tiny
    a = load_checkpoint(train(cfg, train_dir, tmp_path / "a").final_checkpoint)["model"]
    b = load_checkpoint(train(cfg, train_dir, tmp_path / "b").final_checkpoint)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_workers_give_the_same_run_twice(tiny, tmp_path):
    cfg, train_dir = tiny
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": 2, "max_steps": 4})})
    logs = []
    for name in ("a", "b"):
        with open(train(cfg, train_dir, tmp_path / name).train_log) as f:
            logs.append([row["loss"] for row in csv.DictReader(f)])
    assert logs[0] == logs[1]


def test_checkpoints_are_kept_pruned_and_load_with_weights_only(tiny, tmp_path):
    cfg, train_dir = tiny
    result = train(cfg, train_dir, tmp_path)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-00000003.pt", "step-00000006.pt"]
    state = load_checkpoint(kept[-1])
    assert state["step"] == 6 and {"model", "optimizer", "scheduler", "model_config"} <= set(state)
    final = load_checkpoint(result.final_checkpoint)
    assert final["step"] == 8 and final["model_config"] == cfg.model.model_dump(mode="json")
    assert not list(tmp_path.rglob("*.tmp"))


def test_step_log_has_one_row_per_step_with_the_scheduled_lr(tiny, tmp_path):
    cfg, train_dir = tiny
    result = train(cfg, train_dir, tmp_path)
    with open(result.train_log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    for r in rows:  # the lr logged after step s is the one the next step uses
        expected = cfg.train.lr * warmup_cosine(int(r["step"]), cfg.train.warmup_steps, 8)
        assert math.isclose(float(r["lr"]), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_loss_decreases_when_training_longer(tiny, tmp_path):
    cfg, train_dir = tiny
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 40, "lr": 2e-3})})
    with open(train(cfg, train_dir, tmp_path).train_log) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2


def test_non_finite_loss_stops_with_the_step_number(tiny, tmp_path, monkeypatch):
    cfg, train_dir = tiny
    from lightclip_core.train import trainer as module

    real = module.compute_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, terms, outputs = real(*args)
        return loss * (float("nan") if calls["n"] == 5 else 1.0), terms, outputs

    monkeypatch.setattr(module, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 5"):
        train(cfg, train_dir, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003.pt"]


def test_warmup_then_cosine_to_zero():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_plan_rejects_a_batch_larger_than_the_split():
    cfg = Config.model_validate({**TINY, "train": {**TINY["train"], "batch_size": 512, "max_steps": None}})
    with pytest.raises(ValueError, match="batch_size=512"):
        plan_steps(cfg, 256)
