"""Training from existing weights (`model.init_from`) and WiSE-FT weight interpolation in the export (issue #19).

A run started from a checkpoint, a train directory, an export, an `s3://` copy or a registered model version holds
exactly the saved model before its first update; the start weights travel in its checkpoints and change its resume
fingerprint. The export interpolates `(1 - alpha) * start + alpha * fine-tuned` on the unfolded weights, checked
against a brute-force formula and against models whose weights the test averages by hand. The default (no
`init_from`) draws no extra random numbers and writes no start weights."""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from helpers_reparam import randomize_statistics
from helpers_start import capture_at_optimizer, student_at_step_0
from helpers_tiny import TINY, merge
from torch import nn

from lightclip_core.cli import EXIT_BAD_INPUT, main
from lightclip_core.config import Config, ConfigError, flatten
from lightclip_core.data.prepare import prepare
from lightclip_core.export.exporter import export, parity_inputs
from lightclip_core.export.load import load_exported
from lightclip_core.export.wise_ft import has_wise_ft, interpolate_state, read_endpoints, wise_ft_model
from lightclip_core.infra import storage
from lightclip_core.losses.objective import build_objectives
from lightclip_core.models.clip import CLIP
from lightclip_core.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lightclip_core.train.start import load_start
from lightclip_core.train.trainer import seed_everything, train

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = merge(TINY, {
    "data": {"synthetic": {"num_val": 8, "num_test": 8}},
    "model": {"embed_dim": 16, "image": {"tower": "mobilenetv2_050"}, "text": {"context_length": 16, "width": 32}},
    "objectives": {"distill": {"enabled": False}},
    "train": {"threads": 1, "shuffle_buffer": 32},
    "tracking": {"enabled": False},
    "export": {"onnx": False, "parity_batch": 2},
})
# a text tower that folds (RepMixer blocks): its export is not the training-time model
FOLDING_MODEL = merge(PARAMS["model"], {"text": {"kind": "mct", "causal": False, "layers": 1}})


def config(init_from: str | None = None, model: dict | None = None, **sections: dict) -> Config:
    return Config.model_validate(merge(PARAMS, {**sections, "model": {**(model or {}), "init_from": init_from}}))


@torch.no_grad()
def embeddings(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of fixed inputs, in eval mode."""
    inputs = parity_inputs(model, 3, seed=1)
    model = model.eval()
    return model.encode_image(inputs["image"]), model.encode_text(inputs["text"])


def model_with(cfg: Config, state: dict[str, torch.Tensor]) -> CLIP:
    model = CLIP(cfg.model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A real short training (6 steps), its export, and the prepared data."""
    root = tmp_path_factory.mktemp("wise-ft")
    cfg = config()
    prepare(cfg.data, root / "data")
    result = train(cfg, root / "data" / "train", root / "base")
    export(cfg, result.final_checkpoint, root / "export")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    return {"root": root, "data": root / "data" / "train", "run": root / "base", "final": result.final_checkpoint,
            "export": root / "export", "params": params}


# ------------------------------------------------------------------------------------------ starting from weights
@pytest.mark.parametrize("source", ["checkpoint", "train directory", "export directory"])
def test_the_student_starts_as_the_saved_model(source, base, tmp_path):
    value = {"checkpoint": base["final"], "train directory": base["run"], "export directory": base["export"]}[source]
    cfg = config(str(value))
    student = student_at_step_0(cfg, base["data"], tmp_path / "run")["model"]
    saved = model_with(cfg, load_checkpoint(base["final"])["model"])
    assert same_state(student.state_dict(), saved.state_dict())
    student.visual.to(memory_format=torch.contiguous_format)  # the trainer's channels-last layout rounds differently
    for got, expected in zip(embeddings(student), embeddings(saved)):
        assert torch.equal(got, expected)
    for got, expected in zip(embeddings(student), embeddings(load_exported(base["export"]).model)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_student_starts_as_a_model_registered_in_mlflow(base, mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from lightclip_core.register.registration import log_pyfunc
    from lightclip_core.tracking.mlflow_utils import StageRun

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    for name in ("LIGHTCLIP_PIPELINE_RUN", "KFP_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    name = f"start-{uuid.uuid4().hex[:6]}"
    tracked = config(tracking={"enabled": True, "experiment": "init-from-tests", "spool_dir": str(tmp_path / "spool")})
    with StageRun(tracked, "register") as run:  # as `lightclip register` logs and registers a version
        info = log_pyfunc(tracked, base["export"], run)
    version = mlflow.register_model(info.model_uri, name).version
    MlflowClient(mlflow_server.uri).set_registered_model_alias(name, "champion", version)

    for value in (f"models:/{name}@champion", f"models:/{name}/{version}"):
        student = student_at_step_0(config(value), base["data"], tmp_path / "run")["model"]
        saved = model_with(config(), load_checkpoint(base["final"])["model"])
        assert same_state(student.state_dict(), saved.state_dict())

    code, err = cli_train(base, f"model.init_from=models:/{name}-absent@champion")
    assert code == EXIT_BAD_INPUT and "model.init_from='models:/" in err and "no such registered model" in err


def test_the_student_starts_from_s3_copies_of_a_run_and_an_export(base, s3_env, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="starts")
    storage.publish_dir(base["run"], "s3://starts/run", last=("final.pt",))
    storage.publish_dir(base["export"], "s3://starts/export", last=("config.json",))
    saved = load_checkpoint(base["final"])["model"]
    for value in ("s3://starts/run", "s3://starts/run/final.pt", "s3://starts/export/"):
        student = student_at_step_0(config(value), base["data"], tmp_path / "run")["model"]
        assert same_state(student.state_dict(), saved), value


def test_a_run_from_weights_records_them_and_resumes_exactly(base, tmp_path, monkeypatch):
    from test_resume import Crash, crash_after_checkpoint

    cfg = config(str(base["final"]))
    start = load_checkpoint(base["final"])["model"]
    uninterrupted = load_checkpoint(train(cfg, base["data"], tmp_path / "a", start=start).final_checkpoint)
    assert same_state(uninterrupted["start_model"], start)
    assert uninterrupted["lineage"]["init_from"] == str(base["final"])
    assert "init_from" not in uninterrupted["model_config"]  # the architecture only: an export rebuilds from it

    crash_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Crash):
        train(cfg, base["data"], tmp_path / "b", start=start)
    monkeypatch.undo()
    assert same_state(load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])["start_model"], start)
    resumed = train(cfg, base["data"], tmp_path / "b", start=start)
    assert resumed.resumed_from == 3
    final = load_checkpoint(resumed.final_checkpoint)
    assert same_state(final["model"], uninterrupted["model"])
    assert same_state(final["start_model"], start)


@pytest.mark.parametrize("change", ["other start weights", "the same path with other content", "no start weights"])
def test_other_start_weights_never_resume_this_runs_checkpoints(change, base, tmp_path, monkeypatch, caplog):
    from test_resume import Crash, crash_after_checkpoint

    path = tmp_path / "start.pt"
    path.write_bytes(base["final"].read_bytes())
    start = load_checkpoint(path)["model"]
    crash_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Crash):
        train(config(str(path)), base["data"], tmp_path / "run", start=start)
    monkeypatch.undo()
    other = load_checkpoint(list_checkpoints(base["run"] / "checkpoints")[0])["model"]  # the base run at step 3
    cfg, weights = {"other start weights": (config(str(list_checkpoints(base["run"] / "checkpoints")[0])), other),
                    "the same path with other content": (config(str(path)), other),
                    "no start weights": (config(), None)}[change]
    with caplog.at_level(logging.WARNING):
        assert train(cfg, base["data"], tmp_path / "run", start=weights).resumed_from == 0
    assert any("different training configuration" in r.getMessage() for r in caplog.records)


def test_start_weights_of_other_shapes_name_the_first_differing_key():
    cfg = config("somewhere.pt")
    model = CLIP(cfg.model)
    state = model.state_dict()
    name = next(iter(state))
    wrong = {**state, name: torch.zeros(3, 1)}
    with pytest.raises(ConfigError, match=f"model.init_from='somewhere.pt'.*{name!r} has shape \\[3, 1\\]"):
        load_start(model, wrong, cfg.model.init_from)
    with pytest.raises(ConfigError, match="'extra.weight' is not in the model"):
        load_start(model, {**state, "extra.weight": torch.zeros(1)}, cfg.model.init_from)
    missing = dict(state)
    del missing["logit_scale"]
    with pytest.raises(ConfigError, match="'logit_scale' is missing"):
        load_start(model, missing, cfg.model.init_from)


# ------------------------------------------------------------------------------------------ bad values, via the CLI
def cli_train(base: dict[str, Path], *overrides: str, params: Path | None = None) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--params", str(params or base["params"]), "--data", str(base["data"]),
                     "--out", str(base["root"] / "never"), *(a for o in overrides for a in ("--set", o))])
    assert not (base["root"] / "never").exists()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


def test_another_architecture_and_a_folded_export_are_one_line_errors(base, tmp_path):
    code, err = cli_train(base, f"model.init_from={base['run']}", "model.embed_dim=32")
    assert code == EXIT_BAD_INPUT
    assert "model.init_from=" in err and "model.embed_dim=16 there, 32 in params" in err

    folding = config(model=FOLDING_MODEL)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "final.pt", {"model": randomize_statistics(CLIP(folding.model)).state_dict(),
                                                   "model_config": folding.model.architecture(), "step": 1})
    export(folding, ckpt, tmp_path / "folded")
    sets = [f"model.{k}={json.dumps(v)}" for k, v in flatten(FOLDING_MODEL).items()]
    code, err = cli_train(base, *sets, f"model.init_from={tmp_path / 'folded'}")
    assert code == EXIT_BAD_INPUT
    assert "the export's weights are folded" in err and "training checkpoint (final.pt)" in err, err


# ------------------------------------------------------------------------------------------ the default is unchanged
def test_the_default_draws_no_extra_random_numbers_and_writes_no_start_weights(base, tmp_path):
    cfg = config()
    with pytest.MonkeyPatch.context() as mp:
        seen = capture_at_optimizer(mp, stop=False)
        result = train(cfg, base["data"], tmp_path / "run")
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # the trainer's set-up before init_from existed
    build_objectives(cfg, CLIP(cfg.model), None)
    assert torch.equal(seen[0]["rng"], torch.get_rng_state())
    for path in [result.final_checkpoint, *list_checkpoints(tmp_path / "run" / "checkpoints")]:
        ckpt = load_checkpoint(path)
        assert "start_model" not in ckpt and "init_from" not in ckpt["model_config"], path
    assert "init_from" not in load_checkpoint(result.final_checkpoint)["lineage"]
    # starting from weights draws nothing either: the same random stream as a random start from here on
    started = student_at_step_0(config(str(base["final"])), base["data"], tmp_path / "started")
    assert torch.equal(started["rng"], seen[0]["rng"])


# ------------------------------------------------------------------------------------------ WiSE-FT
def test_interpolation_is_the_per_tensor_formula():
    torch.manual_seed(0)
    start, end = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 3),
                                                                                       nn.BatchNorm2d(4))
    end[1].running_var.uniform_(0.5, 2.0)
    end[1].num_batches_tracked.fill_(7)
    s, e = start.state_dict(), end.state_dict()
    for alpha in (0.0, 0.3, 0.5, 1.0):
        mixed = interpolate_state(s, e, alpha)
        assert mixed.keys() == e.keys()
        for name in e:
            if not e[name].is_floating_point():
                assert torch.equal(mixed[name], e[name])
                continue
            expected = [(1 - alpha) * a + alpha * b for a, b in zip(s[name].double().flatten().tolist(),
                                                                    e[name].double().flatten().tolist())]
            assert mixed[name].dtype == e[name].dtype
            torch.testing.assert_close(mixed[name].double().flatten(), torch.tensor(expected, dtype=torch.float64),
                                       atol=1e-7, rtol=1e-6)
    assert same_state(interpolate_state(s, e, 1.0), e)
    assert all(torch.equal(interpolate_state(s, e, 0.0)[k], s[k]) for k in s if s[k].is_floating_point())
    for alpha in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            interpolate_state(s, e, alpha)
    with pytest.raises(ValueError, match="'1.running_mean' is missing"):
        interpolate_state({k: v for k, v in s.items() if k != "1.running_mean"}, e, 0.5)


@pytest.fixture(scope="module")
def wise_exports(tmp_path_factory) -> dict:
    """A checkpoint of a run started from weights (a folding architecture, trained-looking statistics) exported at
    alpha 0, 0.5 and 1, and the same fine-tuned weights exported from a checkpoint without start weights."""
    root = tmp_path_factory.mktemp("wise-exports")
    cfg = config(model=FOLDING_MODEL)
    torch.manual_seed(0)
    start = randomize_statistics(CLIP(cfg.model), seed=1).state_dict()
    finetuned = randomize_statistics(CLIP(cfg.model), seed=2).state_dict()
    common = {"model": finetuned, "model_config": cfg.model.architecture(), "step": 6,
              "lineage": {"init_from": "models:/lightclip@champion"}}
    with_start = save_checkpoint(root / "final.pt", {**common, "start_model": start})
    plain = save_checkpoint(root / "plain.pt", common)
    out = {"cfg": cfg, "start": start, "finetuned": finetuned, "plain": export(cfg, plain, root / "plain").out_dir,
           "plain_ckpt": plain, "root": root}
    for alpha in (0.0, 0.5, 1.0):
        out[alpha] = export(config(model=FOLDING_MODEL, export={"wise_ft_alpha": alpha}), with_start,
                            root / f"alpha-{alpha}").out_dir
    return out


def test_alpha_0_exports_the_start_model(wise_exports):
    reference = embeddings(model_with(wise_exports["cfg"], wise_exports["start"]))
    for got, expected in zip(embeddings(load_exported(wise_exports[0.0]).model), reference):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_alpha_1_is_bit_identical_to_an_export_without_wise_ft(wise_exports):
    plain, full = wise_exports["plain"], wise_exports[1.0]
    assert (plain / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    for got, expected in zip(embeddings(load_exported(full).model), embeddings(load_exported(plain).model)):
        assert torch.equal(got, expected)
    assert not (plain / "wise_ft.safetensors").exists() and "wise_ft" not in json.loads(
        (plain / "config.json").read_text())


def test_alpha_half_exports_the_average_of_the_unfolded_endpoints(wise_exports):
    start, finetuned = wise_exports["start"], wise_exports["finetuned"]
    by_hand = {k: (start[k] + finetuned[k]) / 2 if finetuned[k].is_floating_point() else finetuned[k]
               for k in finetuned}
    reference = embeddings(model_with(wise_exports["cfg"], by_hand))
    for got, expected in zip(embeddings(load_exported(wise_exports[0.5]).model), reference):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_export_keeps_both_endpoints_and_records_the_interpolation(wise_exports):
    export_dir = wise_exports[0.5]
    config = json.loads((export_dir / "config.json").read_text())
    assert config["wise_ft"] == {"alpha": 0.5, "endpoints": "wise_ft.safetensors",
                                 "init_from": "models:/lightclip@champion"}
    assert config["files"]["wise_ft_endpoints"] == "wise_ft.safetensors"
    start, finetuned = read_endpoints(export_dir / "wise_ft.safetensors")
    assert same_state(start, wise_exports["start"]) and same_state(finetuned, wise_exports["finetuned"])
    assert has_wise_ft(export_dir) and not has_wise_ft(wise_exports["plain"])


def test_wise_ft_model_at_the_exported_alpha_is_the_exported_model(wise_exports):
    for alpha in (0.0, 0.5, 1.0):
        rebuilt, exported = wise_ft_model(wise_exports[alpha], alpha), load_exported(wise_exports[alpha])
        assert same_state(rebuilt.model.state_dict(), exported.model.state_dict())
        for got, expected in zip(embeddings(rebuilt.model), embeddings(exported.model)):
            assert torch.equal(got, expected)
        assert torch.equal(rebuilt.tokenize("a red circle"), exported.tokenize("a red circle"))
    # any alpha from any of them: the export at alpha 0 from the one at alpha 0.5
    assert same_state(wise_ft_model(wise_exports[0.5], 0.0).model.state_dict(),
                      load_exported(wise_exports[0.0]).model.state_dict())
    with pytest.raises(ValueError, match="model.init_from"):
        wise_ft_model(wise_exports["plain"], 0.5)


def test_alpha_without_start_weights_is_refused_before_any_file(wise_exports):
    cfg = config(model=FOLDING_MODEL, export={"wise_ft_alpha": 0.5})
    out = wise_exports["root"] / "refused"
    with pytest.raises(ConfigError, match="export.wise_ft_alpha=0.5: .*no start weights.*model.init_from"):
        export(cfg, wise_exports["plain_ckpt"], out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the evaluation's curve
def write_class_folders(root: Path) -> Path:
    """A 2-class image-folder benchmark set of plain coloured squares."""
    from PIL import Image

    for label, rgb in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        (root / label).mkdir(parents=True)
        for n in range(3):
            Image.new("RGB", (24, 24), tuple(max(0, c - 20 * n) for c in rgb)).save(root / label / f"{n}.png")
    return root


def test_evaluation_reports_every_alpha_as_the_export_at_that_alpha(wise_exports, base, tmp_path):
    from lightclip_core.evaluate.evaluation import evaluate

    test_dir = base["root"] / "data" / "test"
    bench = {"name": "colours", "format": "imagefolder", "path": str(write_class_folders(tmp_path / "colours"))}
    plain_eval = {"batch_size": 4, "benchmarks": [bench]}
    cfg = config(model=FOLDING_MODEL, evaluate={**plain_eval, "wise_ft_alphas": [1.0, 0.0, 0.5]})
    assert cfg.evaluate.wise_ft_alphas == [0.0, 0.5, 1.0]
    result = evaluate(cfg, wise_exports[0.5], test_dir, tmp_path / "eval")
    for alpha, key in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        # the reference: the model exported at that alpha, evaluated without the curve
        reference = evaluate(config(model=FOLDING_MODEL, evaluate=plain_eval), wise_exports[alpha], test_dir,
                             tmp_path / f"reference-{key}").metrics
        curve = {k.removeprefix(f"wise_ft/{key}/"): v for k, v in result.metrics.items()
                 if k.startswith(f"wise_ft/{key}/")}
        assert curve and "benchmark/colours/top1" in curve and "zeroshot/colour/top1" in curve
        assert curve == pytest.approx({k: reference[k] for k in curve}, abs=1e-9)
    exported = {k: v for k, v in result.metrics.items() if not k.startswith("wise_ft/") and k != "num_test_samples"}
    assert all(result.metrics[f"wise_ft/0.5/{k}"] == pytest.approx(v) for k, v in exported.items())
    report = result.report["markdown"].read_text()
    assert "## WiSE-FT" in report and "| 0.5 (exported) |" in report and "(plots/wise_ft.png)" in report
    assert (tmp_path / "eval" / "plots" / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"


def test_a_curve_of_an_export_without_endpoints_is_refused_before_the_model_loads(wise_exports, base, tmp_path):
    from lightclip_core.evaluate.evaluation import evaluate

    cfg = config(model=FOLDING_MODEL, evaluate={"wise_ft_alphas": [0.5]})
    with pytest.raises(ConfigError, match=r"evaluate.wise_ft_alphas=\[0.5\]: .* no WiSE-FT endpoints"):
        evaluate(cfg, wise_exports["plain"], base["root"] / "data" / "test", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    from lightclip_core.config import validate

    with pytest.raises(ConfigError, match=r"evaluate.wise_ft_alphas=\[0.5, 1.5\]: .*\[0, 1\], got 1.5"):
        validate({"evaluate": {"wise_ft_alphas": [0.5, 1.5]}})
