"""Step-level checkpoints and exact resume: a run killed at any step (SIGKILL, or inside a checkpoint write) and run
again ends with the weights of a run that was never interrupted, bit for bit (CPU, deterministic mode); a truncated
or corrupted newest checkpoint is named in a warning and the previous one is used; a changed configuration starts
afresh."""
from __future__ import annotations

import copy
import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightclip_core.config import Config
from lightclip_core.data.prepare import prepare
from lightclip_core.train import trainer as trainer_module
from lightclip_core.train.checkpoint import list_checkpoints, load_checkpoint, newest_valid_checkpoint
from lightclip_core.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
# 240 samples in shards of 64, 64, 64, 48: an epoch is 7 steps of 32 (the rest is dropped), so 12 steps cross an
# epoch boundary; with two loader workers the workers hold different sample counts.
PARAMS = {
    "data": {"samples_per_shard": 64, "synthetic": {"num_train": 240, "num_val": 8, "num_test": 8, "image_size": 32}},
    "model": {"embed_dim": 32, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 2}},
    "objectives": {"contrastive": {"soft_targets": "similarity", "similarity_source": "ema"},  # EMA state too
                   "token": {"enabled": True},
                   # random masks: RNG state
                   "mlm": {"enabled": True, "fusion": [{"text_layer": 0, "image_stride": 8}]},
                   "distill": {"enabled": False}},
    "train": {"batch_size": 32, "max_steps": STEPS, "warmup_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2,
              "workers": 0, "shuffle_buffer": 32, "threads": 1},
    "tracking": {"enabled": False},
}


def config(**train) -> Config:
    raw = copy.deepcopy(PARAMS)
    raw["train"].update(train)
    return Config.model_validate(raw)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(config().data, out)
    return out / "train"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """The uninterrupted run: final weights and step log."""
    result = train(config(), data, tmp_path_factory.mktemp("reference"))
    return load_checkpoint(result.final_checkpoint)["model"], read_log(result.train_log)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]


def assert_same_run(out: Path, reference) -> None:
    weights, rows = reference
    final = load_checkpoint(out / "final.pt", require_checksum=True)["model"]
    assert final.keys() == weights.keys()
    different = [k for k in weights if not torch.equal(final[k], weights[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert read_log(out / "train_log.csv") == rows  # one row per step, the same losses, no duplicated steps


# ------------------------------------------------------------------------------------------ a real process, killed
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


def command(params: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lightclip_core.cli", "train", "--params", str(params), "--data", str(data),
            "--out", str(out)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "train_log.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max(0, len([line for line in lines[1:] if line.endswith(tuple("0123456789"))]))


def run_and_kill(cmd: list[str], when, poll_s: float, timeout: float = 180.0) -> None:
    """Start `cmd`, SIGKILL it as soon as `when()` is true; fails if it ends first."""
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not when():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run did not get there in time"
            time.sleep(poll_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_sigkill_at_a_step_and_inside_a_checkpoint_write_then_rerun_ends_bit_identical(data, reference, tmp_path):
    """Killed twice: once after step 3 (wherever it is then), once while the checkpoint after step 8 or later is being
    written; the partial write leaves the previous checkpoint loadable, and the third run ends as if never stopped."""
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    cmd = command(params_file(tmp_path), data, out)

    run_and_kill(cmd, lambda: logged_steps(out) >= 3, poll_s=0.02)
    first_kill = logged_steps(out)
    assert 3 <= first_kill < STEPS and not (out / "final.pt").exists()

    def writing() -> bool:  # the temporary file of a checkpoint write exists: the write is under way
        return logged_steps(out) >= 8 and any(n.startswith(".step-") for n in os.listdir(ckpt_dir))

    run_and_kill(cmd, writing, poll_s=0.0)
    second_kill = logged_steps(out)
    assert first_kill < second_kill < STEPS
    assert [n for n in os.listdir(ckpt_dir) if n.endswith(".tmp")], "the kill did not land inside a write"
    survivor = newest_valid_checkpoint(ckpt_dir)
    assert survivor is not None and survivor[1]["step"] == second_kill - 1  # the write of step second_kill was cut

    done = run_to_end(cmd)
    assert f"resuming after step {second_kill - 1}" in done.stderr
    assert not [n for n in os.listdir(ckpt_dir) if n.endswith(".tmp")]
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------ in-process crashes
class Crash(BaseException):
    """Stands for the process dying right after a checkpoint (BaseException: nothing in the trainer catches it)."""


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    real = trainer_module.prune_checkpoints

    def prune_then_crash(directory, keep):
        real(directory, keep)
        if list_checkpoints(directory) and list_checkpoints(directory)[-1].name == f"step-{step:08d}.pt":
            raise Crash(step)

    monkeypatch.setattr(trainer_module, "prune_checkpoints", prune_then_crash)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no checksum"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(damage, data, reference, tmp_path,
                                                                         monkeypatch, caplog):
    out = tmp_path / "run"
    crash_after_checkpoint(monkeypatch, 6)
    with pytest.raises(Crash):
        train(config(), data, out)
    monkeypatch.undo()
    newest = out / "checkpoints" / "step-00000006.pt"
    raw = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped byte":
        newest.write_bytes(raw[:1000] + bytes([raw[1000] ^ 1]) + raw[1001:])
    else:
        newest.with_name(newest.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING):
        result = train(config(), data, out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000006.pt" in w for w in warnings), warnings
    assert result.resumed_from == 5
    assert (out / "checkpoints" / "step-00000006.pt.corrupt").exists()
    assert_same_run(out, reference)


def test_resume_with_two_loader_workers_of_unequal_shards_is_exact(data, tmp_path, monkeypatch):
    """Two DataLoader workers take turns; after a resume the worker whose turn it was continues, and each worker
    skips exactly the samples it had delivered (also across the epoch boundary at step 7)."""
    cfg = config(workers=2)
    uninterrupted = train(cfg, data, tmp_path / "reference")
    expected = (load_checkpoint(uninterrupted.final_checkpoint)["model"], read_log(uninterrupted.train_log))
    out = tmp_path / "run"
    for step in (3, 8):  # an odd number of batches consumed: worker 1's turn next
        crash_after_checkpoint(monkeypatch, step)
        with pytest.raises(Crash):
            train(cfg, data, out)
        monkeypatch.undo()
    assert train(cfg, data, out).resumed_from == 8
    assert_same_run(out, expected)


def test_a_changed_configuration_starts_afresh_with_a_warning(data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Crash):
        train(config(), data, out)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        result = train(config(lr=5e-4, max_steps=2), data, out)
    assert result.resumed_from == 0
    assert any("different training configuration" in r.getMessage() for r in caplog.records)
    assert [p.name for p in list_checkpoints(out / "checkpoints.old-0")] == ["step-00000003.pt", "step-00000004.pt"]
    assert [int(r["step"]) for r in read_log(out / "train_log.csv")] == [1, 2]
    # what does not change the computation (how often to checkpoint or log) resumes
    crash_after_checkpoint(monkeypatch, 1)
    with pytest.raises(Crash):
        train(config(lr=5e-4, max_steps=3), data, tmp_path / "again")
    monkeypatch.undo()
    assert train(config(lr=5e-4, max_steps=3, checkpoint_every=5, log_every=2), data,
                 tmp_path / "again").resumed_from == 1
