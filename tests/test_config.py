"""params.yaml validation: every bad value stops the command with one line naming the field, exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightclip_core.cli import main
from lightclip_core.config import Config, ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_spells_out_the_schema_defaults():
    assert load_config(ROOT / "params.yaml") == Config()


def test_overrides_are_parsed_as_yaml_scalars():
    cfg = load_config(ROOT / "params.yaml", ["train.lr=5e-4", "train.max_steps=7", "model.image.tower=resnet18"])
    assert cfg.train.lr == 5e-4 and cfg.train.max_steps == 7 and cfg.model.image.tower == "resnet18"


def test_flat_params_use_dotted_keys():
    flat = Config().flat()
    assert flat["train.lr"] == Config().train.lr and flat["model.text.layers"] == Config().model.text.layers


# (override, a fragment the one-line message must contain)
BAD_INPUTS = [
    ("train.lr=-1", "train.lr"),
    ("train.lr=fast", "train.lr"),
    ("train.batch_size=1", "train.batch_size"),
    ("train.batch_size=3.5", "train.batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("train.epochs=0", "train.epochs"),
    ("train.learning_rate=0.1", "train.learning_rate: unknown key"),
    ("train.accum_steps=0", "train.accum_steps"),
    ("train.accum_steps=3", "train.batch_size=128 is not divisible by train.accum_steps=3"),
    ("train.samples_per_epoch=64", "train.samples_per_epoch=64 is smaller than train.batch_size=128"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s"),
    ("train.compile=maybe", "train.compile"),
    ("trian.lr=0.1", "trian: unknown key"),
    ("model.image.tower=not_a_timm_model", "not_a_timm_model"),
    ("model.text.width=250", "divisible"),
    ("model.text.context_length=100", "model.text.context_length"),
    ("model.image.std=[0.2,0.0,0.2]", "std"),
    ("model.image.mean=[0.5,0.5]", "model.image.mean"),
    ("data.source=laion", "data.source"),
    ("data.source=coco", "data.ingest.path"),
    ("data.source=imagefolder", "needs data.ingest.path"),
    ("data.synthetic.noise_fraction=1.5", "data.synthetic.noise_fraction"),
    ("data.ingest.val_fraction=0.97", "val_fraction + test_fraction"),
    ("evaluate.templates=['a photo of a dog']", "slot"),
    ("evaluate.recall_at=[0, 5]", "recall_at"),
    ("export.opset=7", "export.opset"),
    ("tracking.experiment=''", "tracking.experiment"),
    ("tracking.flush_timeout_s=-1", "tracking.flush_timeout_s"),
    ("registry.margin=-0.1", "registry.margin"),
    ("registry.model_name=a/b", "registry.model_name"),
    ("reinforce.ops={Rotat: 3}", "reinforce.ops: unknown op 'Rotat'; allowed: `all`, or a mapping"),
    ("reinforce.ops={Rotate: 31}", "reinforce.ops: op Rotate: magnitude bin 31 is not an int in [0, 30]"),
    ("reinforce.ops={Rotate: 2.5}", "magnitude bin 2.5"),
    ("reinforce.ops=[Rotate, Color]", "reinforce.ops=['Rotate', 'Color']: expected `all`, or a mapping"),
    ("reinforce.ops=some", "Solarize, AutoContrast, Equalize"),
    ("reinforce.crop_scale=[0.9, 0.5]", "reinforce.crop_scale=[0.9, 0.5]: expected 0 < low <= high"),
]


@pytest.mark.parametrize("override,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_value_gives_one_line_naming_the_field(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "params.yaml", [override])
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message


def test_reinforce_ops_take_all_or_a_pool_kept_in_table_order():
    assert load_config(ROOT / "params.yaml", ["reinforce.ops=all"]).reinforce.ops == "all"
    cfg = validate({"reinforce": {"ops": {"Sharpness": 9, "Rotate": 3}}})
    assert list(cfg.reinforce.ops.items()) == [("Rotate", 3), ("Sharpness", 9)]  # torchvision's order, not the file's
    assert cfg.flat()["reinforce.ops.Rotate"] == 3
    same = validate({"reinforce": {"ops": {"Rotate": 3, "Sharpness": 9}}})
    assert same == cfg and same.model_dump_json() == cfg.model_dump_json()
    with pytest.raises(ConfigError, match=r"^reinforce.ops: expected .*at least one op"):
        validate({"reinforce": {"ops": {}}})
    # an override merges into params.yaml's pool like any section: one op's bin changes, the others stay
    default = load_config(ROOT / "params.yaml").reinforce.ops
    tuned = load_config(ROOT / "params.yaml", ["reinforce.ops.Rotate=2"]).reinforce.ops
    assert tuned == {**default, "Rotate": 2}


def test_missing_ingest_path_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["data.source=webdataset", f"data.ingest.path={tmp_path / 'nowhere'}"])


def test_missing_params_file_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_strict_loading_keeps_the_forms_params_files_use(tmp_path):
    """The stricter loader (tests/test_bad_params.py) keeps what params files rely on: PyYAML reads `1e-3` as a
    string, which is still the float 0.001; an int is a float; a `<<` merge may override the keys it brings; the
    same key in two different mappings is not a duplicate."""
    cfg = load_config(ROOT / "params.yaml", ["train.lr=1e-3", "train.epochs=2",
                                             "objectives.distill.teacher_scales=[1, 2.5]"])
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 2.0 and cfg.objectives.distill.teacher_scales == [1.0, 2.5]
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  seed: 1\ntrain:\n  seed: 2\nteacher:\n  train: &coca {steps: 5, lr: 0.01}\n"
                      "  second:\n    <<: *coca\n    lr: 0.02\n")
    cfg = load_config(params)
    assert (cfg.data.seed, cfg.train.seed) == (1, 2)
    assert (cfg.teacher.second.steps, cfg.teacher.second.lr, cfg.teacher.train.lr) == (5, 0.02, 0.01)


def test_cli_exits_2_with_one_line_before_any_work(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["batch_size"] = -4
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    code = main(["prepare", "--params", str(params), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "train.batch_size=-4" in err
    assert not out.exists()


def test_cli_missing_input_path_exits_2(tmp_path, capsys):
    code = main(["train", "--params", str(ROOT / "params.yaml"), "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_console_script_reports_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightclip_core.cli", "train", "--params", str(ROOT / "params.yaml"),
                             "--set", "train.lr=abc", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "train.lr='abc'" in result.stderr


def test_cli_metrics_file_has_the_summary_numbers_and_the_stage_wall_time(tmp_path, capsys):
    """`--metrics` (DVC's committed metrics files): the numbers of the printed summary, nested keys slash-joined,
    no strings or booleans, plus the stage's wall time."""
    metrics = tmp_path / "metrics" / "prepare.json"
    code = main(["prepare", "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "data"), "--metrics",
                 str(metrics), "--set", "data.synthetic.num_train=20", "--set", "data.synthetic.num_val=4",
                 "--set", "data.synthetic.num_test=4", "--set", "tracking.enabled=false"])
    summary = json.loads(capsys.readouterr().out)
    written = json.loads(metrics.read_text())
    assert code == 0 and summary["counts"] == {"train": 20, "val": 4, "test": 4}
    assert {k: v for k, v in written.items() if k != "wall_time_s"} == {
        "counts/train": 20.0, "counts/val": 4.0, "counts/test": 4.0,
        **{f"skipped/{k}": float(v) for k, v in summary["skipped"].items()}}
    assert 0 < written["wall_time_s"] < 60  # measured in ms


def test_console_shows_this_projects_lines_and_the_log_file_everything(tmp_path, monkeypatch, capsys):
    import logging
    import warnings

    from lightclip_core.cli import setup_logging

    monkeypatch.setenv("LIGHTCLIP_LOG_DIR", str(tmp_path / "logs"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logging.captureWarnings(False)  # an earlier in-process `main` left logging's capture pointing at pytest's
    try:
        path = setup_logging("teacher", verbose=False, rank=None)
        logging.getLogger().warning("No pretrained weights loaded for model 'local-dir:x'")  # open_clip's way
        logging.getLogger("onnxscript").info("exporter chatter")
        logging.getLogger("lightclip_core.stages").info("teacher trained")
        logging.getLogger("mlflow").error("server gone")
        warnings.warn("a library warning")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in saved[0]:
                handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    console = capsys.readouterr().err
    assert "teacher trained" in console and "server gone" in console
    assert "No pretrained" not in console and "exporter chatter" not in console and "a library warning" not in console
    written = path.read_text()
    assert path == tmp_path / "logs" / "teacher.log"
    for line in ("No pretrained weights loaded", "exporter chatter", "teacher trained", "server gone", "a library warning"):
        assert line in written
