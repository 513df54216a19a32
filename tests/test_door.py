"""The command line as a person with their own data meets it (issue #19, item 4): `--data` takes a prepared root as
well as a split, every flag of every stage says what it is and shows its default, the same input has the same flag
in every stage, and `prepare` says when a split is small and refuses an empty training split."""
from __future__ import annotations

import argparse
import json
import logging

from pathlib import Path

import pytest

from lightclip_core import cli
from lightclip_core.config import load_config
from lightclip_core.data.prepare import SMALL_SPLIT, check_split_sizes, prepare
from lightclip_core.data.skips import DataError
from lightclip_core.stages.io import split_of

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")
TINY_DATA = ["data.samples_per_shard=64", "data.synthetic.num_train=128", "data.synthetic.num_val=16",
             "data.synthetic.num_test=32", "data.synthetic.image_size=32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A prepared root (train/, val/, test/) of the tiny synthetic set."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(load_config(None, TINY_DATA).data, out)
    return out


def test_a_prepared_root_names_its_split_and_a_split_names_itself(root, tmp_path):
    assert split_of(root, "train") == str(root / "train")
    assert split_of(root, "test") == str(root / "test")
    assert split_of(root / "val", "train") == str(root / "val")  # a split stays the split it is
    assert split_of(tmp_path / "nothing", "train") == str(tmp_path / "nothing")  # the checks after it say what lacks


def test_a_prepared_root_on_s3_names_its_split(s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="door")
    client.put_object(Bucket="door", Key="data/train/manifest.json", Body=b"{}")
    assert split_of("s3://door/data", "train") == "s3://door/data/train"
    assert split_of("s3://door/data/train", "train") == "s3://door/data/train"
    assert split_of("s3://door/data", "test") == "s3://door/data"  # no test split there: unchanged


def test_train_given_a_prepared_root_reads_its_train_split(root, tmp_path, capsys):
    """The first input check already looks at root/train: a batch larger than that split (128 samples) is refused,
    naming it, with exit code 2 and nothing written."""
    code = cli.main(["train", "--params", PARAMS, "--data", str(root), "--out", str(tmp_path / "train"),
                     "--set", "tracking.enabled=false", "--set", "objectives.distill.enabled=false",
                     "--set", "train.batch_size=256"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a prepared root: reading its train split" in err[0], err  # the console's INFO line says so
    errors = [line for line in err if line.startswith("lightclip train: error:")]
    assert code == 2 and len(errors) == 1, err
    assert f"--data='{root / 'train'}'" in errors[0] and "(128 samples)" in errors[0], err
    assert not (tmp_path / "train").exists()


def _stage_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name in cli.COMMANDS}


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_says_what_it_is_and_help_shows_its_default(command, capsys):
    parser = _stage_parsers()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, (command, action.option_strings)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if isinstance(action.default, str) and action.option_strings and action.default != argparse.SUPPRESS:
            assert f"(default: {action.default})" in text, (command, action.option_strings)


def test_an_input_has_the_same_flag_in_every_stage():
    """--data is a split (or a prepared root), --model a model, --out the stage's output; export reads its
    checkpoint from --model like evaluate and register read theirs (--checkpoint stays as an alias)."""
    parsers = _stage_parsers()
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in parsers.items()}
    for stage in ("teacher", "reinforce", "train", "evaluate"):
        assert "--data" in flags[stage], stage
    for stage in ("export", "evaluate", "register"):
        assert "--model" in flags[stage], stage
    assert all("--out" in flags[s] for s in flags if s not in ("tracking", "index-reinforced")), flags
    for spelling in ("--model", "--checkpoint"):
        args = parsers["export"].parse_args([spelling, "run/final.pt"])
        assert args.checkpoint == "run/final.pt"


def test_prepare_warns_once_about_small_splits(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lightclip_core.data.prepare"):
        result = prepare(load_config(None, TINY_DATA).data, tmp_path / "data")
    assert result.counts == {"train": 128, "val": 16, "test": 32}
    lines = [r.getMessage() for r in caplog.records if "samples:" in r.getMessage()]
    assert len(lines) == 1 and "val=16, test=32" in lines[0] and "train=" not in lines[0], lines
    assert f"under {SMALL_SPLIT} samples" in lines[0]


def test_prepare_refuses_an_empty_training_split_and_keeps_the_previous_output(tmp_path, capsys):
    """Every image of a one-class folder lands in val or test (val_fraction + test_fraction = 0.99): one line, exit
    code 1 (broken input data), and the earlier prepared output is untouched."""
    from PIL import Image

    folder = tmp_path / "own" / "cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "data"
    prepare(load_config(None, TINY_DATA).data, out)
    before = json.loads((out / "train" / "manifest.json").read_text())
    cfg = load_config(None, ["data.source=imagefolder", f"data.ingest.path={folder.parent}",
                             "data.ingest.val_fraction=0.5", "data.ingest.test_fraction=0.49"]).data
    code = cli.main(["prepare", "--params", PARAMS, "--out", str(out), "--set", "tracking.enabled=false",
                     *(f"--set={o}" for o in ["data.source=imagefolder", f"data.ingest.path={folder.parent}",
                                              "data.ingest.val_fraction=0.5", "data.ingest.test_fraction=0.49"])])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightclip prepare: error:")]
    assert code == 1 and len(errors) == 1 and "the training split is empty" in errors[0], errors
    assert json.loads((out / "train" / "manifest.json").read_text()) == before
    with pytest.raises(DataError, match="data.ingest.val_fraction=0.5"):
        check_split_sizes(cfg, {"train": 0, "val": 1, "test": 1})
