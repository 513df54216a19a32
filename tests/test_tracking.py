"""Tracking against a real `mlflow server`: one parent run per pipeline execution with a child run per stage and
lineage, a stage that fails at once when the server is unreachable, an outage in the middle of training that
loses no metric (delivered when the server returns, or by `lightclip tracking sync`) and is logged once, not once
per retry, a killed stage whose run does not stay RUNNING, and credentials in a URI that are never shown."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightclip_core.cli import EXIT_TRACKING, main
from lightclip_core.config import Config
from lightclip_core.data.prepare import prepare
from lightclip_core.tracking.mlflow_utils import StageRun, manifest_digest
from lightclip_core.tracking.spool import Journal, Outbox, sync_spool

ROOT = Path(__file__).resolve().parents[1]


def tracking_config(spool: Path, experiment: str, **tracking: object) -> Config:
    return Config.model_validate({"tracking": {"experiment": experiment, "spool_dir": str(spool),
                                               "system_metrics_interval_s": 0.2, **tracking}})


@pytest.fixture(scope="module")
def train_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = Config.model_validate({"data": {"samples_per_shard": 16, "synthetic": {
        "num_train": 32, "num_val": 4, "num_test": 4, "image_size": 16}}})
    out = tmp_path_factory.mktemp("data") / "data"
    prepare(cfg.data, out)
    return out / "train"


@pytest.fixture
def at_server(mlflow_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    for name in ("LIGHTCLIP_PIPELINE_RUN", "KFP_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    return mlflow_server


def test_one_parent_run_per_pipeline_with_one_child_per_stage(at_server, train_split, monkeypatch, tmp_path):
    pipeline = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("LIGHTCLIP_PIPELINE_RUN", pipeline)
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-42")
    cfg = tracking_config(tmp_path / "spool", "lineage")
    runs = []
    for stage in ("prepare", "train"):
        with StageRun(cfg, stage, inputs={"data": train_split}) as run:
            run.log_metrics({"loss": 0.5, "retrieval/R@1": 0.25}, step=1)
        runs.append(run)
    assert runs[0].parent_run_id == runs[1].parent_run_id is not None
    assert run.undelivered == 0 and not list((tmp_path / "spool").glob("*.jsonl"))

    client = MlflowClient(at_server.uri)
    parent = client.get_run(run.parent_run_id)
    assert parent.data.tags["lightclip.role"] == "pipeline"
    assert parent.data.tags["lightclip.pipeline_id"] == pipeline
    assert parent.data.tags["kfp.run_id"] == "kfp-run-42"
    assert parent.data.params["train.lr"] == str(cfg.train.lr)
    assert parent.info.status == "FINISHED"
    # MLflow's UI opens an experiment of this kind on its training runs, not on the GenAI traces overview
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["stage"] for c in children) == ["prepare", "train"]

    child = client.get_run(run.run_id)
    tags = child.data.tags
    assert tags["kfp.run_id"] == "kfp-run-42" and tags["lightclip.pipeline_id"] == pipeline
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("True", "False")
    assert tags["dvc.input.data"].endswith(".dir")
    assert tags["data.data.manifest_sha256"] == manifest_digest(train_split)
    assert child.data.params["model.image.tower"] == cfg.model.image.tower
    assert child.data.metrics["retrieval/R_at_1"] == 0.25
    assert any(key.startswith("system/cpu") for key in child.data.metrics)  # system metrics
    (dataset,) = child.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest_digest(train_split)[:32]
    assert dataset.dataset.name == "synthetic-train"
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]
    assert json.loads(dataset.dataset.profile)["num_samples"] == 32


def test_a_stage_without_pipeline_id_has_no_parent(at_server, tmp_path):
    with StageRun(tracking_config(tmp_path / "spool", "lineage"), "export") as run:
        pass
    assert run.parent_run_id is None
    assert "mlflow.parentRunId" not in MlflowClient(at_server.uri).get_run(run.run_id).data.tags


def test_unreachable_server_stops_the_stage_before_any_work(train_split, monkeypatch, tmp_path, capsys):
    from conftest import _free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    out = tmp_path / "train"
    started = time.monotonic()
    code = main(["train", "--params", str(ROOT / "params.yaml"), "--data", str(train_split), "--out", str(out),
                 "--set", f"tracking.spool_dir={tmp_path / 'spool'}",  # valid inputs: they are checked first
                 "--set", "train.batch_size=32", "--set", "objectives.distill.enabled=false"])
    assert code == EXIT_TRACKING
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0] and "127.0.0.1" in err[0]
    assert not out.exists()  # nothing was trained


def history(client: MlflowClient, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_outage_during_training_loses_no_metric(at_server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spool = tmp_path / "spool"
    # A ends while the server is down (its rest waits for `sync`); B lives through the outage and the restart.
    run_a = StageRun(tracking_config(spool, "outage", flush_timeout_s=1.0), "train").__enter__()
    run_b = StageRun(tracking_config(spool, "outage", flush_timeout_s=120.0), "train").__enter__()
    for step in range(1, 6):
        run_a.log_metrics({"loss": 1.0 / step}, step=step)
        run_b.log_metrics({"loss": 2.0 / step}, step=step)

    at_server.stop()
    slowest = 0.0
    for step in range(6, 16):  # training goes on: logging never waits for the server
        started = time.monotonic()
        run_a.log_metrics({"loss": 1.0 / step}, step=step)
        run_b.log_metrics({"loss": 2.0 / step}, step=step)
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    assert slowest < 0.5
    run_a.__exit__(None, None, None)
    assert run_a.undelivered > 0
    assert (spool / f"{run_a.run_id}.jsonl").is_file()

    at_server.start()
    for step in range(16, 21):
        run_b.log_metrics({"loss": 2.0 / step}, step=step)
    run_b.__exit__(None, None, None)  # delivers everything spooled during the outage
    assert run_b.undelivered == 0

    assert main(["tracking", "sync", "--params", str(ROOT / "params.yaml"), "--spool-dir", str(spool)]) == 0
    assert not list(spool.glob("*.jsonl"))

    client = MlflowClient(at_server.uri)
    assert history(client, run_a.run_id) == [(s, 1.0 / s) for s in range(1, 16)]  # each step exactly once
    assert history(client, run_b.run_id) == [(s, 2.0 / s) for s in range(1, 21)]
    assert client.get_run(run_a.run_id).info.status == "FINISHED"
    assert client.get_run(run_b.run_id).info.status == "FINISHED"
    # one line when the server went away and one when it came back, not one per retried request (B sees the outage
    # only if the server is still away when urllib3's retries of a request run out; a fast restart hides it)
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    lines = [r.getMessage() for r in caplog.records if run_b.run_id in r.getMessage()]
    went = sum(line.startswith("tracking server unreachable (") for line in lines)
    assert went == sum(line.startswith("tracking server reachable again") for line in lines) <= 1


def test_sync_resends_only_unacknowledged_operations_and_skips_journals_in_use(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("journal")).info.run_id
    path = tmp_path / "spool" / f"{run_id}.jsonl"
    journal = Journal(path, {"run_id": run_id, "tracking_uri": uri})
    seqs = [journal.append({"op": "metrics", "metrics": [["loss", float(i), 1000 + i, i]]}) for i in range(1, 6)]
    journal.ack(seqs[0])  # step 1 was delivered before the crash
    assert sync_spool(tmp_path / "spool") == {}  # in use by a (running) stage: left alone
    journal.close(remove=False)
    with open(path, "a") as f:
        f.write('{"seq": 6, "op": "metr')  # the line the crash cut short never counted as logged
    assert sync_spool(tmp_path / "spool") == {run_id: 5}  # steps 2 to 5, and the end of the run its process never sent
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "KILLED"
    assert not path.exists()


@pytest.mark.parametrize("uri,shown", [
    ("https://bob:s3cret@mlflow.example.com:5000/base", "https://***@mlflow.example.com:5000/base"),
    ("http://token@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_credentials_in_a_tracking_uri_are_never_shown(uri, shown):
    from lightclip_core.tracking.spool import redact_uri

    assert redact_uri(uri) == shown


def test_an_unreachable_server_message_carries_no_credentials():
    from lightclip_core.tracking.mlflow_utils import check_reachable
    from lightclip_core.tracking.spool import TrackingUnavailable

    with pytest.raises(TrackingUnavailable) as info:
        check_reachable(f"http://alice:hunter2@127.0.0.1:{_closed_port()}")
    assert "hunter2" not in str(info.value) and "alice" not in str(info.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- killed stages
_KILLED_STAGE = """
import sys, time
from lightclip_core.config import Config
from lightclip_core.tracking.mlflow_utils import StageRun
cfg = Config.model_validate({"tracking": {"experiment": sys.argv[1], "spool_dir": sys.argv[2],
                                          "system_metrics_interval_s": 0}})
run = StageRun(cfg, "train").__enter__()
for step in range(1, 4):
    run.log_metrics({"loss": 1.0 / step}, step=step)
print(run.run_id, run.parent_run_id, flush=True)
time.sleep(600)
"""


def killed_stage(experiment: str, spool: Path) -> tuple[str, str]:
    """Start a stage's run in another process, kill it with SIGKILL; returns its run id and pipeline run id."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_STAGE, experiment, str(spool)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line, "the stage's process ended before it started its run"
        run_id, parent_id = line.split()
    finally:
        proc.kill()
        proc.wait()
    return run_id, parent_id


def minimal_params(path: Path, **tracking: object) -> Path:
    path.write_text(json.dumps({"tracking": tracking}))  # JSON is YAML
    return path


def test_sync_ends_the_run_of_a_killed_stage_as_killed(at_server, tmp_path, monkeypatch):
    secret_uri = at_server.uri.replace("http://", "http://alice:hunter2@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    monkeypatch.setenv("LIGHTCLIP_PIPELINE_RUN", f"killed-{uuid.uuid4().hex[:8]}")
    spool = tmp_path / "spool"
    run_id, parent_id = killed_stage("killed", spool)
    client = MlflowClient(at_server.uri)
    assert client.get_run(run_id).info.status == "RUNNING" == client.get_run(parent_id).info.status
    journal = spool / f"{run_id}.jsonl"
    assert journal.is_file() and "hunter2" not in journal.read_text()  # kept without credentials

    params = minimal_params(tmp_path / "params.yaml", experiment="killed")
    assert main(["tracking", "sync", "--params", str(params), "--spool-dir", str(spool)]) == 0
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and killed.info.end_time >= killed.info.start_time
    assert client.get_run(parent_id).info.status == "KILLED"
    assert history(client, run_id) == [(s, 1.0 / s) for s in range(1, 4)]  # what it logged before it died
    assert not journal.exists()


def test_the_next_stage_ends_the_run_of_a_killed_stage_as_killed(at_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_PIPELINE_RUN", f"killed-{uuid.uuid4().hex[:8]}")
    run_id, parent_id = killed_stage("killed-next", tmp_path / "spool-a")
    monkeypatch.delenv("LIGHTCLIP_PIPELINE_RUN")
    with StageRun(tracking_config(tmp_path / "spool-b", "killed-next"), "export") as next_run:
        pass
    client = MlflowClient(at_server.uri)
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert "is gone" in killed.data.tags["lightclip.ended_by"]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert client.get_run(next_run.run_id).info.status == "FINISHED"
    assert sync_spool(tmp_path / "spool-a").keys() == {run_id}  # what the killed stage left is still delivered
    assert client.get_run(run_id).info.status == "KILLED"


def test_runs_of_other_hosts_end_only_when_their_heartbeat_stops(tmp_path, monkeypatch):
    import psutil

    from lightclip_core.tracking.liveness import end_abandoned_runs, owner_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("hosts")
    now = int(time.time() * 1000)
    elsewhere = {"lightclip.owner.host": "elsewhere", "lightclip.owner.pid": "1",
                 "lightclip.owner.started": str(now - 3_600_000)}
    started_here = int(psutil.Process().create_time() * 1000)
    hour_ago = now - 3_600_000
    runs = {name: client.create_run(experiment, start_time=hour_ago, tags=tags).info.run_id for name, tags in {
        "silent": {**elsewhere, "lightclip.heartbeat": str(now - 901_000)},
        "beating": {**elsewhere, "lightclip.heartbeat": str(now - 120_000)},
        "not ours": {},  # no owner tags: another tool's run, or an older version's
        "same host name, other machine": {**owner_tags(), "lightclip.owner.pid": "4194304",  # no such pid here
                                          "lightclip.owner.pid_space": "another-boot/pid:[4026531836]"},
        "this process": owner_tags(),
        "reused pid": {**owner_tags(), "lightclip.owner.started": str(started_here - 60_000)},
        "ended in an outage": {**owner_tags(), "lightclip.owner.started": str(started_here - 60_000)},
    }.items()}
    spool = tmp_path / "spool"  # the last one's process ended it, but the server was away: `sync` delivers its end
    journal = Journal(spool / f"{runs['ended in an outage']}.jsonl", {"run_id": runs["ended in an outage"],
                                                                      "tracking_uri": uri})
    journal.append({"op": "end", "status": "FINISHED", "end_time": now, "parent_run_id": None})
    journal.close(remove=False)
    with StageRun(tracking_config(spool, "hosts"), "export"):
        pass

    def status(name: str) -> str:
        return client.get_run(runs[name]).info.status

    assert [status(n) for n in runs] == ["KILLED", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "KILLED", "RUNNING"]
    sync_spool(spool)
    assert status("ended in an outage") == "FINISHED"
    assert client.get_run(runs["silent"]).info.end_time == now - 901_000  # its last sign of life
    monkeypatch.setenv("LIGHTCLIP_RUN_STALE_AFTER_S", "60")
    assert end_abandoned_runs(client, experiment) == [runs["beating"]]


def test_an_outage_is_one_warning_not_one_per_retry(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    caplog.set_level(logging.INFO)
    outbox = Outbox(tmp_path / "spool", uuid.uuid4().hex, f"http://alice:hunter2@127.0.0.1:{_closed_port()}")
    for step in range(1, 6):
        outbox.put({"op": "metrics", "metrics": [["loss", 1.0 / step, 1000 + step, step]]})
    deadline = time.monotonic() + 60  # the first request gives up after urllib3's retries (longer on a busy machine)
    while time.monotonic() < deadline and not any(r.levelno >= logging.WARNING for r in caplog.records):
        time.sleep(0.2)
    time.sleep(4)  # then more attempts fail: urllib3's retries and the outbox's own after 1 and 2 s
    assert outbox.close(0.5) == 5
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1 and records[0].getMessage().startswith("tracking server unreachable (")
    assert "hunter2" not in caplog.text and "alice" not in caplog.text


def test_credentials_in_the_tracking_uri_reach_no_parameter_log_line_or_output(at_server, tmp_path, monkeypatch,
                                                                                capsys):
    secret_uri = at_server.uri.replace("http://", "http://alice:hunter2@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    monkeypatch.setenv("LIGHTCLIP_LOG_DIR", str(tmp_path / "logs"))
    experiment = f"redaction-{uuid.uuid4().hex[:8]}"
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "data": {"samples_per_shard": 8, "synthetic": {"num_train": 8, "num_val": 4, "num_test": 4, "image_size": 16}},
        "tracking": {"experiment": experiment, "uri": secret_uri, "spool_dir": str(tmp_path / "spool"),
                     "system_metrics_interval_s": 0}}))
    assert main(["prepare", "--params", str(params), "--out", str(tmp_path / "data")]) == 0
    assert main(["tracking", "url", "--params", str(params), "--ui", secret_uri]) == 0
    out, err = capsys.readouterr()
    client = MlflowClient(at_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.params["tracking.uri"] == at_server.uri.replace("http://", "http://***@")
    log_text = (tmp_path / "logs" / "prepare.log").read_text()
    assert f"at {at_server.uri.replace('http://', 'http://***@')}" in log_text  # where the run went, masked
    shown = json.dumps([run.data.params, run.data.tags]) + out + err + log_text
    assert "hunter2" not in shown and "alice" not in shown
