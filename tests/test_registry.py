"""The model registry against a real `mlflow server`: every evaluated model becomes a version with the alias
`candidate`; `champion` moves only when the candidate beats it by the margin; a failure leaves the champion
untouched; the champion loads in a fresh process and predicts embeddings and zero-shot labels."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from lightclip_core.cli import EXIT_BAD_INPUT, main
from lightclip_core.config import Config
from lightclip_core.data.prepare import prepare
from lightclip_core.data.shards import read_manifest
from lightclip_core.evaluate.evaluation import evaluate
from lightclip_core.export.exporter import export
from lightclip_core.export.inference import Embedder
from lightclip_core.models.clip import CLIP
from lightclip_core.register import registration as registry
from lightclip_core.register.registration import decide
from lightclip_core.train.checkpoint import save_checkpoint
from lightclip_core.train.trainer import training_lineage

ROOT = Path(__file__).resolve().parents[1]
GATE = "zeroshot/colour_shape/top1"
TINY = {
    "data": {"samples_per_shard": 32, "synthetic": {"num_train": 32, "num_val": 4, "num_test": 24, "image_size": 32}},
    "model": {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}},
    "export": {"parity_batch": 2},
    "evaluate": {"batch_size": 32},
}


# ------------------------------------------------------------------------------------------------ the gate
@pytest.mark.parametrize("champion", [None, 0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("margin", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("candidate", [0.0, 0.29, 0.3, 0.305, 0.35, 0.5, 0.61, 1.0])
def test_promotion_iff_the_candidate_beats_the_champion_by_more_than_the_margin(candidate, champion, margin):
    decision = decide(candidate, champion, margin)
    assert decision.promote == (champion is None or candidate > champion + margin)
    assert decision.reason


def test_a_champion_without_a_recorded_figure_is_not_replaced():
    assert not decide(0.9, None, 0.0, champion_exists=True).promote


# ------------------------------------------------------------------------------------------------ fixtures
def write_train_log(path: Path) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "epoch", "loss", "contrastive_loss", "lr", "logit_scale", "samples_per_s"])
        for step in range(1, 11):
            out.writerow([step, 0, 4 / step, 4 / step, 1e-3 * min(1, step / 3), 14.3, 100.0])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real export of a tiny model and its real evaluation on a tiny synthetic test split."""
    root = tmp_path_factory.mktemp("registry")
    cfg = Config.model_validate(TINY)
    prepare(cfg.data, root / "data")
    torch.manual_seed(0)
    state = {"model": CLIP(cfg.model).state_dict(), "model_config": cfg.model.model_dump(mode="json"), "step": 10,
             "lineage": training_lineage(cfg, read_manifest(root / "data" / "train"))}  # as `train` writes it
    export(cfg, save_checkpoint(root / "final.pt", state), root / "export")
    write_train_log(root / "train_log.csv")
    evaluate(cfg, root / "export", root / "data" / "test", root / "eval", train_log=root / "train_log.csv")
    return {"root": root, "export": root / "export", "eval": root / "eval", "train": root / "data" / "train",
            "test": root / "data" / "test", "train_log": root / "train_log.csv"}


def eval_with_gate(evaluated: dict[str, Path], value: float, where: Path) -> Path:
    """A copy of the evaluation whose gate metric is `value` (the figure the gate reads)."""
    shutil.copytree(evaluated["eval"], where)
    metrics = json.loads((where / "metrics.json").read_text())
    metrics[GATE] = value
    (where / "metrics.json").write_text(json.dumps(metrics))
    return where


def point_at(mp: pytest.MonkeyPatch, server) -> None:
    """Track to `server`, outside any pipeline execution."""
    mp.setenv("MLFLOW_TRACKING_URI", server.uri)
    for name in ("LIGHTCLIP_PIPELINE_RUN", "KFP_RUN_ID", "DVC_STAGE"):
        mp.delenv(name, raising=False)


@pytest.fixture
def at_server(mlflow_server, monkeypatch: pytest.MonkeyPatch):
    point_at(monkeypatch, mlflow_server)
    return mlflow_server


def run_register(evaluated: dict[str, Path], eval_dir: Path, out: Path, model_name: str, *overrides: str,
                 export_dir: Path | None = None) -> tuple[int, dict]:
    """`lightclip register` in this process; its exit code and the decision it prints."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["register", "--params", str(ROOT / "params.yaml"),
                     "--model", str(export_dir or evaluated["export"]),
                     "--eval", str(eval_dir), "--train-data", str(evaluated["train"]),
                     "--test-data", str(evaluated["test"]), "--train-log", str(evaluated["train_log"]),
                     "--out", str(out), "--set", f"registry.model_name={model_name}",
                     "--set", "tracking.experiment=registry-tests",
                     "--set", f"tracking.spool_dir={out.parent / 'spool'}", *(f"--set={o}" for o in overrides)])
    lines = buffer.getvalue().splitlines()  # MLflow's "View run" lines first, then the one-line summary
    return code, (json.loads(lines[-1]) if code == 0 else {})


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


@pytest.fixture(scope="module")
def champion(evaluated, mlflow_server, tmp_path_factory) -> dict:
    """One registered model with a single version, its champion; shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("champion") / "register"
    name = f"champion-{uuid.uuid4().hex[:6]}"
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, mlflow_server)
        code, decision = run_register(evaluated, evaluated["eval"], out, name)
    assert code == 0
    return {"name": name, "version": decision["version"], "out": out, "decision": decision}


# --------------------------------------------------------------------------------------------- registration
def test_champion_moves_only_when_the_candidate_beats_it_by_the_margin(at_server, evaluated, tmp_path):
    name = f"gate-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(at_server.uri)
    steps = [(0.30, "promoted", "1"), (0.33, "not promoted", "1"), (0.40, "promoted", "3")]
    for i, (value, expected, champion_after) in enumerate(steps, start=1):
        eval_dir = eval_with_gate(evaluated, value, tmp_path / f"eval{i}")
        code, decision = run_register(evaluated, eval_dir, tmp_path / f"register{i}", name,
                                      "registry.margin=0.05")
        assert code == 0
        assert decision["decision"] == expected and decision["version"] == str(i)
        assert aliases(client, name) == {"candidate": str(i), "champion": champion_after}
        tags = client.get_model_version(name, str(i)).tags
        assert tags["gate.decision"] == expected
        assert float(tags["gate.candidate_value"]) == value
        assert json.loads((tmp_path / f"register{i}" / "decision.json").read_text())["decision"] == expected
    refused = client.get_model_version(name, "2").tags
    assert float(refused["gate.champion_value"]) == 0.30 and refused["gate.champion_version"] == "1"
    assert "does not beat" in refused["gate.reason"]
    promoted = client.get_model_version(name, "3").tags
    assert float(promoted["gate.champion_value"]) == 0.30 and promoted["gate.champion_version"] == "1"
    report = (tmp_path / "register3" / "report.md").read_text()
    assert "Comparison with the current champion" in report and "**replaces** champion version 1" in report


def test_a_failure_during_registration_leaves_the_champion_untouched(at_server, evaluated, champion, tmp_path,
                                                                     monkeypatch):
    client = MlflowClient(at_server.uri)
    before = aliases(client, champion["name"])

    def broken(*args, **kwargs):
        raise RuntimeError("the tracking server went away in the middle of the registration")

    monkeypatch.setattr(registry, "set_gate_tags", broken)
    eval_dir = eval_with_gate(evaluated, 0.99, tmp_path / "eval")  # would clearly win
    with pytest.raises(RuntimeError, match="went away"):
        run_register(evaluated, eval_dir, tmp_path / "register", champion["name"])
    assert aliases(client, champion["name"]) == before
    versions = client.search_model_versions(f"name = '{champion['name']}'")
    failed = max(versions, key=lambda v: int(v.version))
    assert failed.version != champion["version"] and failed.tags["gate.decision"] == "failed"
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert not (tmp_path / "register" / "decision.json").exists()


def test_a_bad_gate_metric_stops_before_any_work(at_server, evaluated, tmp_path, capsys):
    name = f"bad-{uuid.uuid4().hex[:6]}"
    code, _ = run_register(evaluated, evaluated["eval"], tmp_path / "register", name,
                           "registry.gate_metric=zeroshot/texture/top1")
    assert code == EXIT_BAD_INPUT
    assert "registry.gate_metric" in capsys.readouterr().err
    assert not MlflowClient(at_server.uri).search_registered_models(f"name = '{name}'")


def test_an_export_that_cannot_serve_is_never_registered(at_server, evaluated, tmp_path, capsys):
    broken = tmp_path / "export"
    shutil.copytree(evaluated["export"], broken)
    (broken / "image_encoder.onnx").write_bytes(b"not an onnx model")
    name = f"broken-{uuid.uuid4().hex[:6]}"
    code, _ = run_register(evaluated, evaluated["eval"], tmp_path / "register", name, export_dir=broken)
    assert code == EXIT_BAD_INPUT
    assert "cannot serve predictions" in capsys.readouterr().err
    assert not MlflowClient(at_server.uri).search_registered_models(f"name = '{name}'")


def test_disabled_registry_writes_a_skipped_decision(evaluated, tmp_path):
    code, decision = run_register(evaluated, evaluated["eval"], tmp_path / "register", "disabled-model",
                                  "registry.enabled=false")
    assert code == 0 and decision["decision"] == "skipped"


def test_model_version_has_a_model_card_signature_and_artifacts(at_server, champion):
    client = MlflowClient(at_server.uri)
    version = client.get_model_version(champion["name"], champion["version"])
    card = version.description
    assert "mobilenetv2_050" in card and "Training data: 32 image-text samples" in card
    assert "promoted to champion" in card and champion["decision"]["run_id"] in card
    assert version.tags["metric.retrieval/image_to_text/R_at_1"]

    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{champion['name']}/{champion['version']}")
    assert {c.name for c in info.signature.inputs.inputs} == {"image", "text"}
    assert {p.name for p in info.signature.params.params} == {"classnames", "templates"}
    assert info.saved_input_example_info is not None
    local = Path(__import__("mlflow").artifacts.download_artifacts(
        f"models:/{champion['name']}/{champion['version']}"))
    assert {"image_encoder.onnx", "text_encoder.onnx", "config.json"} <= {p.name for p in local.rglob("*")}
    requirements = (local / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "torch==" in requirements

    report = champion["out"] / "report.html"
    assert "data:image/png;base64," in report.read_text()  # plots embedded: the page opens anywhere
    assert "There was no champion" in (champion["out"] / "report.md").read_text()


FRESH_PROCESS = """
import io, json, sys
import numpy as np, pandas as pd, mlflow
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
image = np.full((40, 40, 3), 235, np.uint8); image[8:32, 8:32] = (200, 30, 30)
buffer = io.BytesIO(); Image.fromarray(image).save(buffer, format="png")
frame = pd.DataFrame({"image": [buffer.getvalue(), image, None], "text": ["a red square", None, "a blue circle"]})
embedded = model.predict(frame)
labels = model.predict(frame, params={"classnames": ["red square", "blue circle", "green star"]})
print(json.dumps({"embedded": embedded.to_dict(orient="list"), "labels": labels["label"].tolist(),
                  "scores": labels["score"].tolist()}))
"""


def test_champion_loads_in_a_fresh_process_and_predicts(at_server, evaluated, champion):
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, f"models:/{champion['name']}@champion"],
                            capture_output=True, text=True, timeout=300, cwd=evaluated["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    image_emb, text_emb = out["embedded"]["image_embedding"], out["embedded"]["text_embedding"]
    assert [e is None for e in image_emb] == [False, False, True]
    assert [e is None for e in text_emb] == [False, True, False]
    assert all(len(e) == 16 and abs(np.linalg.norm(e) - 1) < 1e-4 for e in image_emb[:2] + [text_emb[0]])
    np.testing.assert_allclose(image_emb[0], image_emb[1], atol=1e-5)  # PNG bytes and the array are one image
    assert out["labels"][:2] == [out["labels"][0]] * 2 and out["labels"][0] in ["red square", "blue circle",
                                                                                 "green star"]
    assert out["labels"][2] is None
    # the same numbers as the export itself gives in this process
    reference = Embedder(evaluated["export"]).encode_texts(["a red square"])[0]
    np.testing.assert_allclose(text_emb[0], reference, atol=1e-5)


# ------------------------------------------------------------------------------------ the evaluation gate
@pytest.mark.parametrize("threshold, value, passes", [(None, 0.01, True), (0.5, 0.5, True), (0.5, 0.7, True),
                                                      (0.5, 0.49, False)])
def test_evaluation_gate_registers_only_models_at_or_above_the_minimum(threshold, value, passes):
    from lightclip_core.config import validate
    from lightclip_core.register.registration import gate_passes

    cfg = validate({"registry": {"min_gate_value": threshold}})
    passed, reason = gate_passes(cfg, {"zeroshot/colour_shape/top1": value, "num_test_samples": 10})
    assert passed is passes
    assert "zeroshot/colour_shape/top1" in reason and ("not registered" in reason) is (not passes)


def test_evaluation_gate_names_a_missing_metric():
    from lightclip_core.config import ConfigError, validate
    from lightclip_core.register.registration import gate_passes

    with pytest.raises(ConfigError, match="registry.gate_metric"):
        gate_passes(validate({}), {"zeroshot/colour/top1": 0.5})
