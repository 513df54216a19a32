"""The trainer: deterministic for a seed, checkpoints readable with weights_only, schedule, divergence stop, gradient
accumulation against a manual reference, gradient checkpointing, and one-line errors for batches that do not split."""
from __future__ import annotations

import csv
import hashlib
import math

import pytest
import torch

from lightclip_core.cli import main
from lightclip_core.config import Config, ConfigError
from lightclip_core.data.prepare import prepare
from lightclip_core.data.shards import read_manifest
from lightclip_core.losses.objective import TrainingLoss, build_objectives
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import trim_padding
from lightclip_core.train.checkpoint import checksum_path, list_checkpoints, load_checkpoint
from lightclip_core.train.data import make_loader
from lightclip_core.train.schedule import build_scheduler, warmup_cosine
from lightclip_core.train.trainer import TrainingDiverged, build_optimizer, plan_steps, seed_everything, train

TINY = {
    "data": {"samples_per_shard": 64, "synthetic": {"num_train": 256, "num_val": 8, "num_test": 8, "image_size": 32}},
    "model": {"embed_dim": 32, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 2}},
    "objectives": {"contrastive": {"soft_targets": "uniform"}, "token": {"enabled": True},  # LightCLIP's three
                   "mlm": {"enabled": True,
                           "fusion": [{"text_layer": 0, "image_stride": 8}, {"text_layer": 1, "image_stride": 32}]},
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


def test_checkpoints_are_kept_pruned_checksummed_and_load_with_weights_only(tiny, tmp_path):
    cfg, train_dir = tiny
    result = train(cfg, train_dir, tmp_path)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-00000003.pt", "step-00000006.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step-00000003.pt", "step-00000003.pt.sha256", "step-00000006.pt", "step-00000006.pt.sha256"]
    for ckpt in kept:  # sha256sum format: "<hex>  <name>"
        assert checksum_path(ckpt).read_text() == f"{hashlib.sha256(ckpt.read_bytes()).hexdigest()}  {ckpt.name}\n"
    state = load_checkpoint(kept[-1], require_checksum=True)
    assert state["step"] == 6 and {"model", "objectives", "optimizer", "scheduler", "model_config", "fingerprint",
                                   "ranks", "world_size", "samples_seen"} <= set(state)
    assert state["world_size"] == 1 and state["samples_seen"] == 6 * 32
    [rank] = state["ranks"]
    assert set(rank["rng"]) == {"python", "numpy", "torch", "cuda"}
    skips = rank["data"].pop("skips")  # what the rank skipped (none here) travels with its position
    assert rank["data"] == {"epoch": 0, "batches": 6, "worker_batches": [6], "next_worker": 0, "samples": 6 * 32,
                            "worker_skipped": [0]}
    assert skips["skipped"] == {} and skips["seen"] >= 6 * 32
    final = load_checkpoint(result.final_checkpoint)
    assert final["step"] == 8 and final["model_config"] == cfg.model.architecture()  # all but model.init_from
    manifest = read_manifest(train_dir)  # the weights carry what they were trained on, for every later report
    assert final["lineage"]["data"] == {"split": "train", "num_samples": manifest["num_samples"],
                                        "num_shards": len(manifest["shards"]), "source": "synthetic",
                                        "tasks": sorted(manifest["tasks"]), "reinforced": False,
                                        "shards_sha256": final["lineage"]["data"]["shards_sha256"]}
    assert final["lineage"]["train"] == cfg.train.model_dump(mode="json")
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
    real = TrainingLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss, terms, outputs = real(self, *args)
        if calls["n"] == 5:
            loss, terms = loss * float("nan"), {**terms, "loss": float("nan")}
        return loss, terms, outputs

    monkeypatch.setattr(TrainingLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 5"):
        train(cfg, train_dir, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003.pt"]


def test_warmup_then_cosine_to_zero():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_holds_the_rate_after_the_warmup():
    assert [warmup_cosine(s, 10, 100, "constant") for s in (0, 9, 10, 55, 99)] == pytest.approx(
        [0.1, 1.0, 1.0, 1.0, 1.0])


def test_image_lr_gives_the_image_tower_its_own_rate_and_the_scheduler_scales_every_group():
    """Every trainable parameter in exactly one group; `visual.*` at train.image_lr, the rest (text tower,
    temperature, objectives) at train.lr; decay only where it was before; a scheduler step scales both rates."""
    cfg = Config.model_validate({**TINY, "train": {**TINY["train"], "lr": 1e-3, "image_lr": 4e-3}})
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_id) == sum(len(g["params"]) for g in optimizer.param_groups) == len(named)
    skip = model.no_weight_decay()
    for name, p in named.items():
        group = by_id[id(p)]
        assert group["lr"] == (4e-3 if name.startswith("visual.") else 1e-3), name
        assert group["weight_decay"] == (0.0 if name in skip else cfg.train.weight_decay), name
    scheduler = build_scheduler(optimizer, 4, 100)
    assert sorted(scheduler.get_last_lr()) == pytest.approx([0.25e-3, 0.25e-3, 1e-3, 1e-3])
    default = build_optimizer(model, Config.model_validate(TINY))
    assert {g["lr"] for g in default.param_groups} == {Config.model_validate(TINY).train.lr}


def test_plan_rejects_a_batch_larger_than_the_split():
    cfg = Config.model_validate({**TINY, "train": {**TINY["train"], "batch_size": 512, "max_steps": None}})
    with pytest.raises(ValueError, match="batch_size=512"):
        plan_steps(cfg, 256)


def with_train(cfg: Config, **update) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def test_accumulation_equals_a_manual_accumulation_reference(tiny, tmp_path):
    """accum_steps=2: each optimizer step averages the gradients of two half batches (whose contrastive negatives are
    their own); the reference does exactly that by hand, on the same half batches in the same order."""
    cfg, train_dir = tiny
    cfg = with_train(cfg, accum_steps=2, max_steps=3, checkpoint_every=100)
    threads = torch.get_num_threads()
    result = train(cfg, train_dir, tmp_path / "run")
    assert torch.get_num_threads() == threads  # train.threads is the stage's own setting, not its caller's

    torch.set_num_threads(cfg.train.threads)  # bit-equal only with the training's intra-op threads
    try:
        model, losses = _manual_accumulation(cfg, train_dir)
    finally:
        torch.set_num_threads(threads)
    trained = load_checkpoint(result.final_checkpoint)["model"]
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    with open(result.train_log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # optimizer steps, not micro-steps
    assert [int(r["samples_seen"]) for r in rows] == [32, 64, 96] and result.samples_seen == 96
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-12)


def _manual_accumulation(cfg, train_dir):
    """Three optimizer steps, each over two half batches in loader order, with the trainer's schedule and clipping."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model)
    model.visual.to(memory_format=torch.channels_last)
    objectives = build_objectives(cfg, model)
    loss_module = TrainingLoss(model, objectives).train()
    optimizer = build_optimizer(model, cfg, objectives)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, 3)
    loader, _ = make_loader(cfg, train_dir)
    assert loader.batch_size == 16
    halves = iter(loader)
    losses = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        micro = []
        for _ in range(2):
            batch = next(halves)
            images = batch["images"].contiguous(memory_format=torch.channels_last)
            loss, terms, _ = loss_module(images, trim_padding(batch["tokens"]), step, 3, {})
            (loss / 2).backward()
            micro.append(terms["loss"])
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_module.after_step()
        losses.append(sum(micro) / 2)
    return model, losses


def test_grad_checkpointing_recomputes_the_image_trunk_and_trains_the_same_weights(tiny, tmp_path):
    cfg, train_dir = tiny
    model = build_model(cfg.model)
    model.set_grad_checkpointing(True)
    assert model.text.transformer.grad_checkpointing
    calls = []
    block = model.visual.trunk.blocks[1][0]
    block_forward = block.forward  # counted by its forward: torch's recomputation does not fire forward hooks
    block.forward = lambda x: (calls.append(1), block_forward(x))[1]
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 8))
    model(images, tokens, image_strides=(8,))["image_features"].sum().backward()
    assert len(calls) == 2  # forward, then again in the backward pass
    text_calls = []
    text_block = model.text.transformer.resblocks[0]
    text_forward = text_block.forward
    text_block.forward = lambda x, attn_mask=None: (text_calls.append(1), text_forward(x, attn_mask=attn_mask))[1]
    model(images, tokens)["text_features"].sum().backward()
    assert len(text_calls) == 2  # the text blocks are recomputed too

    params = []
    for flag in (False, True):
        run = train(with_train(cfg, max_steps=2, grad_checkpointing=flag), train_dir, tmp_path / str(flag))
        state = load_checkpoint(run.final_checkpoint)["model"]
        names = {n for n, _ in build_model(cfg.model).named_parameters()}  # BatchNorm statistics see two forwards
        params.append({k: v for k, v in state.items() if k in names})
    assert all(torch.allclose(params[0][k], params[1][k], atol=1e-6) for k in params[0])


def test_a_global_batch_that_does_not_split_over_ranks_is_a_one_line_error(tiny, tmp_path, monkeypatch, capsys):
    cfg, train_dir = tiny
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")  # no MASTER_ADDR: joining a process group would fail differently
    with pytest.raises(ConfigError, match=r"train.batch_size=32: not divisible by world_size \* train.accum_steps"):
        train(cfg, train_dir, tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(Config.model_validate(TINY).model_dump_json())
    code = main(["train", "--params", str(params), "--data", str(train_dir), "--out", str(tmp_path / "o"),
                 "--set", "train.accum_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "train.batch_size=32" in err and "3 * 2 = 6" in err


def test_accumulation_that_does_not_divide_the_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="train.batch_size=32 is not divisible by train.accum_steps=3"):
        from lightclip_core.config import validate
        validate({**TINY, "train": {**TINY["train"], "accum_steps": 3}})


def test_an_epoch_without_a_full_step_is_a_one_line_error(tiny, tmp_path):
    cfg, train_dir = tiny  # 4 shards of 64; 2 workers of 2 shards each cannot fill a batch of 192 alone
    with pytest.raises(ConfigError, match="train.batch_size=192: no full step"):
        train(with_train(cfg, batch_size=192, workers=2), train_dir, tmp_path)


def test_resampled_virtual_epochs_have_the_asked_length(tiny, tmp_path):
    cfg, train_dir = tiny
    result = train(with_train(cfg, samples_per_epoch=96, max_steps=7, checkpoint_every=100), train_dir, tmp_path)
    with open(result.train_log) as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [0, 0, 0, 1, 1, 1, 2]  # 96 samples = 3 steps of 32 per virtual epoch
