"""The whole DVC pipeline on a tiny config, in a fresh git repository: `dvc repro` end to end, a second repro is a
no-op, `dvc exp run -S` works, every stage logged an MLflow run with lineage tags under one parent run per
`dvc repro`, and the evaluated model was registered as the champion."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_tiny import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore",
                 "lightclip_core", "pyproject.toml"]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh clone-like copy of the project, committed, with the tiny parameters."""
    repo = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"})
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny project"], repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    first = _run([*dvc, "repro"], repo, env)
    return repo, env, dvc, first


def test_repro_produces_every_stage_output(project):
    repo, _, _, _ = project
    assert json.loads((repo / "artifacts/data/train/manifest.json").read_text())["num_samples"] == 256
    assert (repo / "artifacts/train/final.pt").is_file()
    for name in ("model.safetensors", "config.json", "image_encoder.onnx", "text_encoder.onnx", "parity.json"):
        assert (repo / "artifacts/export" / name).is_file(), name
    metrics = json.loads((repo / "artifacts/eval/metrics.json").read_text())
    assert {"zeroshot/colour_shape/top1", "retrieval/image_to_text/R@1"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "num_test_samples")
    assert list((repo / "artifacts/eval/plots").glob("*.png"))
    assert (repo / "artifacts/eval/report.html").is_file()
    decision = json.loads((repo / "artifacts/register/decision.json").read_text())
    assert decision["decision"] == "promoted" and decision["version"] == "1"  # the first model: no champion yet
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "teacher", "reinforce", "train", "export", "evaluate", "register"}
    reinforced = json.loads((repo / "artifacts/reinforced/train/manifest.json").read_text())
    assert reinforced["num_samples"] == 256 and reinforced["reinforcement"]["complete"]
    header = (repo / "artifacts/train/train_log.csv").read_text().splitlines()[0].split(",")
    assert "distill_loss" in header  # the default trains with the distillation loss


def test_second_repro_is_a_no_op(project):
    repo, env, dvc, _ = project
    before = (repo / "artifacts/train/final.pt").stat().st_mtime_ns
    out = _run([*dvc, "repro"], repo, env)
    assert "Running stage" not in out
    assert (repo / "artifacts/train/final.pt").stat().st_mtime_ns == before


def test_every_stage_logged_an_mlflow_run_with_lineage(project):
    import mlflow

    repo, env, _, _ = project
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("lightclip")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    first_repro = [r for r in runs if r.data.tags.get("lightclip.role") == "pipeline"][0]
    by_stage = {r.data.tags["stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == first_repro.info.run_id}
    # one parent, a child per stage
    assert set(by_stage) == {"prepare", "teacher", "reinforce", "train", "export", "evaluate", "register"}
    assert first_repro.data.tags["lightclip.orchestrator"] == "dvc"
    train = by_stage["train"]
    assert len(train.data.tags["git.commit"]) == 40
    assert train.data.tags["dvc.input.data"].endswith(".dir")
    assert train.data.params["train.lr"] == "0.001"
    history = client.get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 7))
    assert "zeroshot/colour_shape/top1" in by_stage["evaluate"].data.metrics
    assert by_stage["train"].inputs.dataset_inputs[0].dataset.name == "synthetic-train"
    assert "summary/samples_per_s" in by_stage["reinforce"].data.metrics
    champion = client.get_model_version_by_alias("lightclip", "champion")
    assert champion.run_id == by_stage["register"].info.run_id


def test_exp_run_with_a_changed_learning_rate(project):
    repo, env, dvc, _ = project
    out = _run([*dvc, "exp", "run", "-S", "train.lr=0.002"], repo, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    shown = json.loads(_run([*dvc, "exp", "show", "--json"], repo, env))
    lrs = set()
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                lrs.add(rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"])
    assert 0.002 in lrs
