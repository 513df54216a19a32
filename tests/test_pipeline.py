"""The whole DVC pipeline on a tiny config, in a fresh git repository: `dvc repro` end to end, a second repro is a
no-op, `dvc exp run -S` works, every stage logged an MLflow run with lineage tags under one parent run per
`dvc repro`, and the evaluated model was registered as the champion."""
from __future__ import annotations

import json

import pytest
import yaml
from helpers_project import DVC, ROOT, make_project
from helpers_project import run as _run
from helpers_tiny import TINY, merge

from lightclip_core.config import Config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh clone-like copy of the project, committed, with the tiny parameters."""
    repo = tmp_path_factory.mktemp("project")
    env = make_project(repo, merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY))
    first = _run([*DVC, "repro"], repo, env)
    return repo, env, DVC, first


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


def test_new_own_data_makes_prepare_stale(project):
    """data/own is a dependency of prepare: a file added there (own data) is seen by DVC, not only a changed path."""
    repo, env, dvc, _ = project
    added = repo / "data" / "own" / "extra.tar"
    added.write_bytes(b"new own data")
    try:
        status = json.loads(_run([*dvc, "status", "--json", "prepare"], repo, env))
        assert {"changed deps": {"data/own": "modified"}} in status["prepare"]
    finally:
        added.unlink()
    assert json.loads(_run([*dvc, "status", "--json", "prepare"], repo, env)) == {}


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
    assert train.data.params["train.lr"] == str(Config().train.lr)  # params.yaml spells out the schema default
    history = client.get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 7))
    assert "zeroshot/colour_shape/top1" in by_stage["evaluate"].data.metrics
    assert by_stage["train"].inputs.dataset_inputs[0].dataset.name == "synthetic-train"
    assert "summary/samples_per_s" in by_stage["reinforce"].data.metrics
    champion = client.get_model_version_by_alias("lightclip", "champion")
    assert champion.run_id == by_stage["register"].info.run_id


def test_exp_run_with_a_changed_learning_rate(project):
    repo, env, dvc, _ = project
    assert Config().train.lr != 0.0005  # a change: the experiment retrains
    out = _run([*dvc, "exp", "run", "-S", "train.lr=0.0005"], repo, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    shown = json.loads(_run([*dvc, "exp", "show", "--json"], repo, env))
    lrs = set()
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                lrs.add(rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"])
    assert 0.0005 in lrs


# ------------------------------------------------------------------------------------ what a stakeholder sees
def test_stakeholder_pages_in_a_real_browser(project):
    """A real MLflow server on the pipeline's results, read in headless Chromium as a person would: the experiment
    opens on its training runs, each stage is a run under its pipeline run, the champion's version page shows the
    alias and the gate decision, and the report describes the data the model was trained on. The screenshots land
    in docs/images/ for the README."""
    import mlflow
    from conftest import MlflowServer
    from helpers_browser import chromium, screenshot, wait_for_element, wait_for_text
    from selenium.webdriver.common.by import By

    from lightclip_core.tracking.mlflow_utils import experiment_page

    repo, env, _, _ = project
    driver = chromium()
    server = MlflowServer(repo)  # the repository's mlflow.db, as `make ui` serves it
    server.start()
    try:
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("lightclip")
        champion = client.get_model_version_by_alias("lightclip", "champion")
        register_run = client.get_run(champion.run_id)
        pipeline_id = register_run.data.tags["mlflow.parentRunId"]
        stages = {r.data.tags["stage"]: r for r in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline_id}'")}

        driver.get(experiment_page(server.uri, experiment.experiment_id))
        text = wait_for_text(driver, "matching runs")
        assert "/runs" in driver.current_url and "No data available" not in text  # the runs, not a traces page
        row = wait_for_element(driver, f"a[href$='/runs/{pipeline_id}']")
        assert row.text.startswith("pipeline ")
        row.find_element(By.XPATH, "./ancestor::div[contains(@class, 'ag-cell')][1]//button").click()  # expand
        for stage in stages:  # every stage of this pipeline run is listed under it once expanded
            wait_for_text(driver, stage)
        shown = {a.text for a in driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")}
        assert set(stages) <= shown, shown
        for button in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):
            button.click()  # the assistant pane, so that the screenshot shows the table
        screenshot(driver, "mlflow-runs")

        driver.get(f"{server.uri}/#/models/lightclip/versions/{champion.version}")
        text = wait_for_text(driver, "gate.decision")
        assert "@ champion" in text and "promoted" in text.split("gate.decision", 1)[1].split("\n")[1]

        # the report in the workspace is about the model its register run registered: the training run of that
        # pipeline run says what the model was trained on and how (dvc exp run retrained it with another lr)
        decision = json.loads((repo / "artifacts" / "register" / "decision.json").read_text())
        reported = client.get_run(decision["run_id"]).data.tags["mlflow.parentRunId"]
        [train] = client.search_runs([experiment.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{reported}' and tags.stage = 'train'"))
        dataset = train.inputs.dataset_inputs[0].dataset
        source, split = dataset.name.rsplit("-", 1)
        profile = json.loads(dataset.profile)
        driver.get((repo / "artifacts" / "register" / "report.html").as_uri())
        text = wait_for_text(driver, "Training data:")
        assert f"LightCLIP model lightclip version {decision['version']}" in text
        line = next(line for line in text.splitlines() if line.startswith("Training data:"))
        assert line.startswith(f"Training data: {profile['num_samples']:,} image-text samples, reinforced {split} split "
                               f"of the {source} dataset ({profile['num_shards']} shards"), line
        line = next(line for line in text.splitlines() if line.startswith("Trained for"))
        assert f"at batch size {train.data.params['train.batch_size']}, learning rate " \
               f"{float(train.data.params['train.lr']):g} ({train.data.params['train.precision']})" in line, line
        screenshot(driver, "report")
    finally:
        driver.quit()
        server.stop()
