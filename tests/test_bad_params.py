"""Malformed parameters and paths (issue #18): each one ends the command with exit code 2 and one line on stderr
naming the field or path, the value and what is allowed, before any work: no traceback, nothing created, no MLflow
run. A genuine bug is not one of them: it keeps its traceback."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from lightclip_core import stages
from lightclip_core.cli import main
from lightclip_core.config import validate
from lightclip_core.models.tokenizer import TOKENIZER_NAME
from lightclip_core.tracking.mlflow_utils import StageRun

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")
TRAIN_SAMPLES = 40


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A tiny prepared dataset (40 training samples in 2 shards, not reinforced), made once for the module."""
    from lightclip_core.data.prepare import prepare

    out = tmp_path_factory.mktemp("bad-params") / "data"
    cfg = validate({"data": {"samples_per_shard": 20, "synthetic": {"num_train": TRAIN_SAMPLES, "num_val": 8,
                                                                    "num_test": 8, "image_size": 16}}})
    prepare(cfg.data, out)
    return out


class Workspace:
    """The working directory of one case: the files a case needs are made here before the command runs; the command
    must add nothing to it."""

    def __init__(self, root: Path, split: Path):
        self.root, self.split = root, split
        self.train, self.test = str(split / "train"), str(split / "test")
        self.out = str(root / "out")

    def file(self, name: str, content: str | bytes = "") -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def dir(self, name: str, **files: str) -> str:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        for file_name, content in files.items():
            (path / file_name.replace("__", ".")).write_text(content)
        return str(path)


def train(*overrides: str, data: str | None = None, out: str | None = None) -> Callable[[Workspace], list[str]]:
    """`lightclip train` on the tiny split with these overrides (parameter cases need a valid rest)."""
    def argv(w: Workspace) -> list[str]:
        sets = [a for o in overrides for a in ("--set", o)]
        return ["train", "--params", PARAMS, "--data", data or w.train, "--out", out or w.out, *sets]
    return argv


def with_params(text: str | bytes, stage: str = "train") -> Callable[[Workspace], list[str]]:
    """`lightclip <stage>` reading a params file of this content."""
    def argv(w: Workspace) -> list[str]:
        path = w.file("params.yaml", text)
        return [stage, "--params", path, *(("--data", w.train) if stage == "train" else ()), "--out", w.out]
    return argv


def case(id_: str, argv: Callable[[Workspace], list[str]], *fragments: str):
    return pytest.param(argv, fragments, id=id_)


NO_DISTILL = ("train.batch_size=32", "objectives.distill.enabled=false")  # a valid training configuration


def saved(obj: object) -> bytes:
    """What `torch.save` writes for `obj` (a checkpoint-like file for a case to put in its workspace)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def init_from(make: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    """`lightclip train` (a valid configuration otherwise) starting from the weights `make` puts in the workspace."""
    return lambda w: train(*NO_DISTILL, f"model.init_from={make(w)}")(w)


OTHER_MODEL = {"model": {}, "model_config": {"embed_dim": 64}}  # params.yaml's model has embed_dim 256
EXPORT_OF_OTHER_MODEL = json.dumps({"format_version": 2, "tokenizer": {"name": TOKENIZER_NAME},
                                    "model_config": {"embed_dim": 64}})
TINY_OPEN_CLIP = json.dumps({"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                                          "patch_size": 16, "head_width": 32},
                                           "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1}}})
DEFAULTS_WITH_TRAIN = "model:\n  embed_dim: 64\ntrain:\n  lr: 0.1\n"
TRAINJOB = ["--nodes", "1", "--gpus-per-node", "0", "--image", "registry/lightclip:0.1", "--data", "/workspace/data",
            "--out", "/workspace/out", "--dry-run"]
BAD_INPUTS = [
    # --set values and keys
    case("set-unclosed-list", train("train.lr=["), "override 'train.lr=['", "not valid YAML"),
    case("set-unclosed-mapping", train("train={lr: 1"), "override 'train={lr: 1'", "not valid YAML"),
    case("set-nested-colons", train("train.lr=a: b: c"), "override 'train.lr=a: b: c'", "not valid YAML"),
    case("set-duplicate-key", train("train={lr: 0.1, lr: 0.2}"), "duplicate key 'lr'"),
    case("set-without-equals", train("train.lr"), "override 'train.lr'", "expected key=value"),
    case("set-empty-key", train("=3"), "override '=3'", "dotted key"),
    case("set-empty-key-part", train("train..lr=3"), "override 'train..lr=3'", "dotted key"),
    case("set-into-a-value", train("train=5", "train.lr=1"), "train.lr", "'train' is set to the value 5"),
    case("set-unknown-section", train("trian.lr=0.1"), "trian: unknown key"),
    case("set-section-to-a-list", train("train=[1, 2]"), "train=[1, 2]", "valid dictionary"),
    # non-finite floats
    case("inf-weight-decay", train("train.weight_decay=.inf"), "train.weight_decay=inf", "finite"),
    case("nan-init-logit-scale", train("model.init_logit_scale=.nan"), "model.init_logit_scale=nan", "finite"),
    case("nan-lr", train("train.lr=.nan"), "train.lr=nan", "finite"),
    case("minus-inf-lr", train("train.lr=-.inf"), "train.lr=-inf", "finite"),
    case("inf-epochs", train("train.epochs=.inf"), "train.epochs=inf", "finite"),
    case("inf-dist-timeout", train("train.dist_timeout_s=.inf"), "train.dist_timeout_s=inf", "finite"),
    case("nan-grad-clip", train("train.grad_clip=.nan"), "train.grad_clip=nan", "finite"),
    case("inf-flush-timeout", train("tracking.flush_timeout_s=.inf"), "tracking.flush_timeout_s=inf", "finite"),
    case("inf-registry-margin", train("registry.margin=.inf"), "registry.margin=inf", "finite"),
    case("nan-min-gate-value", train("registry.min_gate_value=.nan"), "registry.min_gate_value=nan", "finite"),
    case("nan-token-threshold", train("objectives.token.threshold=.nan"), "objectives.token.threshold=nan",
         "finite"),
    case("inf-teacher-scale", train("objectives.distill.teacher_scales=[1.0, .inf]"),
         "objectives.distill.teacher_scales[1]=inf", "finite"),
    case("nan-image-mean", train("model.image.mean=[.nan, 0.5, 0.5]"), "model.image.mean[0]=nan", "finite"),
    case("inf-crop-scale", train("reinforce.crop_scale=[0.5, .inf]"), "reinforce.crop_scale[1]=inf", "finite"),
    case("nan-noise-fraction", train("data.synthetic.noise_fraction=.nan"), "data.synthetic.noise_fraction=nan",
         "finite"),
    case("inf-teacher-lr", train("teacher.train.lr=.inf"), "teacher.train.lr=inf", "finite"),
    case("nan-gate", train("teacher.gate.min_colour_shape=.nan"), "teacher.gate.min_colour_shape=nan", "finite"),
    case("inf-max-logit-scale", train("model.max_logit_scale=.inf"), "model.max_logit_scale=inf", "finite"),
    # booleans are not numbers
    case("bool-max-steps", train("train.max_steps=true"), "train.max_steps=True", "integer, not a boolean"),
    case("bool-batch-size", train("train.batch_size=true"), "train.batch_size=True", "integer, not a boolean"),
    case("bool-seed", train("train.seed=false"), "train.seed=False", "integer, not a boolean"),
    case("bool-lr", train("train.lr=true"), "train.lr=True", "number, not a boolean"),
    case("bool-recall-at", train("evaluate.recall_at=[true, 5]"), "evaluate.recall_at=[True, 5]", "integer"),
    case("bool-opset", train("export.opset=true"), "export.opset=True", "integer, not a boolean"),
    case("bool-fusion-layer", train("objectives.mlm.fusion=[{text_layer: true, image_stride: 8}]"),
         "objectives.mlm.fusion[0].text_layer=True", "integer, not a boolean"),
    case("bool-teacher-steps", train("teacher.train.steps=true"), "teacher.train.steps=True", "integer"),
    case("bool-magnitude-bin", train("reinforce.ops={Rotate: true}"), "reinforce.ops", "magnitude bin True"),
    # the instance-level loss and image-text matching
    case("unknown-contrastive-loss", train("objectives.contrastive.loss=hinge"), "objectives.contrastive.loss='hinge'",
         "'infonce', 'max_violation', 'sum_hinge' or 'sigmoid'"),
    case("zero-margin", train("objectives.contrastive.margin=0"), "objectives.contrastive.margin=0", "greater than 0"),
    case("nan-margin", train("objectives.contrastive.margin=.nan"), "objectives.contrastive.margin=nan", "finite"),
    case("sigmoid-without-bias", train("objectives.contrastive.loss=sigmoid",
                                       "objectives.contrastive.soft_targets=none"),
         "model.init_logit_bias=None", "the sigmoid loss needs", "objectives.contrastive.loss=sigmoid"),
    case("bias-without-sigmoid", train("model.init_logit_bias=-10"), "model.init_logit_bias=-10.0",
         "exactly when objectives.contrastive.loss=sigmoid"),
    case("soft-targets-with-a-hinge", train("objectives.contrastive.loss=max_violation",
                                            "objectives.contrastive.soft_targets=uniform"),
         "objectives.contrastive.soft_targets='uniform'", "loss='max_violation'"),
    case("unknown-itm-negatives", train("objectives.itm.negatives=hardest"), "objectives.itm.negatives='hardest'",
         "'hard' or 'random'"),
    case("itm-without-fusion", train("objectives.itm.enabled=true", "objectives.mlm.fusion=[]"),
         "objectives.itm.enabled=true", "objectives.mlm.fusion"),
    # the params file itself
    case("params-not-utf8", with_params(b"train:\n  lr: \xff\xfe\n"), "params.yaml' is not UTF-8", "0xff"),
    case("params-empty", with_params(""), "params.yaml' is empty"),
    case("params-only-comments", with_params("# nothing here\n"), "params.yaml' is empty"),
    case("params-a-directory", lambda w: ["train", "--params", w.dir("params.d"), "--data", w.train, "--out", w.out],
         "params.d' is a directory"),
    case("params-missing", lambda w: ["train", "--params", str(w.root / "absent.yaml"), "--data", w.train,
                                      "--out", w.out], "absent.yaml' does not exist"),
    case("params-broken-yaml", with_params("train:\n  lr: [0.1\n"), "params.yaml' is not valid YAML", "line"),
    case("params-a-list", with_params("- train\n- model\n"), "top level must be a mapping", "list"),
    case("params-a-scalar", with_params("42\n"), "top level must be a mapping", "int"),
    case("params-duplicate-section", with_params(DEFAULTS_WITH_TRAIN + "train:\n  lr: 0.2\n"),
         "duplicate key 'train' on line 5 (first on line 3)"),
    case("params-duplicate-key", with_params("train:\n  lr: 0.1\n  lr: 0.2\n"),
         "duplicate key 'lr' on line 3 (first on line 2)"),
    case("params-two-documents", with_params("train: {}\n---\nmodel: {}\n"), "not valid YAML", "single document"),
    case("params-null-section", with_params("train:\n"), "train=None", "valid dictionary"),
    case("params-nul-byte", with_params("train:\n  lr: 0.1\x00\n"), "not valid YAML", "unacceptable character"),
    case("params-prepare-duplicate", with_params("data:\n  seed: 1\ndata:\n  seed: 2\n", "prepare"),
         "duplicate key 'data'"),
    # training inputs
    case("train-data-without-manifest", lambda w: train(data=w.dir("nomanifest", shard__tar="x"))(w),
         "--data=", "nomanifest'", "has no manifest.json"),
    case("train-data-missing", lambda w: train(data=str(w.root / "nowhere"))(w), "nowhere'", "does not exist"),
    case("train-data-a-file", lambda w: train(data=w.file("split.tar", "x"))(w), "split.tar'", "not a directory"),
    case("train-batch-larger-than-split", train("train.batch_size=64"), "train.batch_size=64",
         f"({TRAIN_SAMPLES} samples)", f"at most {TRAIN_SAMPLES}"),
    case("train-distill-unreinforced", train("train.batch_size=32"), "objectives.distill.enabled=true",
         "not a reinforced split"),
    case("train-distill-lam-without-clip", train("objectives.contrastive.enabled=false", "objectives.distill.lam=0.5"),
         "objectives.distill.lam=0.5", "objectives.contrastive.enabled=false"),
    case("train-distill-clip-weighted", train("objectives.contrastive.weight=2"), "objectives.contrastive.weight=2.0",
         "1 - objectives.distill.lam"),
    case("train-out-a-file", lambda w: train(*NO_DISTILL, out=w.file("final.pt", "x"))(w),
         "--out=", "final.pt'", "a file is there"),
    case("train-out-under-a-file", lambda w: train(*NO_DISTILL, out=w.file("blocker") + "/run")(w),
         "blocker/run'", "is a file"),
    case("train-manifest-not-json", lambda w: train(data=w.dir("corrupt", manifest__json="{not json"))(w),
         "corrupt'", "manifest.json is not JSON"),
    case("train-manifest-other-version", lambda w: train(data=w.dir("old", manifest__json='{"schema_version": 0}'))(w),
         "old'", "schema_version 0, expected"),
    # the weights training starts from (model.init_from)
    case("init-from-missing", init_from(lambda w: str(w.root / "nowhere.pt")), "model.init_from=", "nowhere.pt'",
         "does not exist", "allowed: a training checkpoint"),
    case("init-from-neither", init_from(lambda w: w.dir("notes", notes__txt="x")), "model.init_from=", "notes'",
         "neither a training checkpoint nor an export directory", "allowed:"),
    case("init-from-not-a-checkpoint", init_from(lambda w: w.file("weights.pt", "not a checkpoint")),
         "model.init_from=", "weights.pt'", "not a readable training checkpoint"),
    case("init-from-checkpoint-without-model", init_from(lambda w: w.file("step.pt", saved({"step": 3}))),
         "step.pt'", "no model and model_config"),
    case("init-from-another-model", init_from(lambda w: w.file("other.pt", saved(OTHER_MODEL))),
         "other.pt'", "model.embed_dim=64 there, 256 in params", "allowed: weights of the model"),
    case("init-from-export-of-another-model", init_from(lambda w: w.dir(
        "export", config__json=EXPORT_OF_OTHER_MODEL, model__safetensors="x")), "export'",
         "model.embed_dim=64 there, 256 in params"),
    case("init-from-malformed-registry-uri", train(*NO_DISTILL, "model.init_from=models:/lightclip"),
         "model.init_from='models:/lightclip'", "models:/<name>@<alias> or models:/<name>/<version>"),
    case("init-from-empty", train(*NO_DISTILL, "model.init_from=''"), "model.init_from=''", "at least 1 character"),
    # an open_clip student (model.open_clip)
    case("open-clip-unknown-model", train(*NO_DISTILL, "model.open_clip={model: NoSuchNet}"),
         "model.open_clip.model='NoSuchNet'", "unknown open_clip model"),
    case("open-clip-local-dir-without-config", lambda w: train(
        *NO_DISTILL, f"model.open_clip={{model: 'local-dir:{w.dir('empty')}'}}")(w),
         "open_clip_config.json does not exist"),
    case("open-clip-contradicted-field",
         train(*NO_DISTILL, "model.open_clip={model: ViT-B-32}", "model.text.width=256"),
         "model.text.width=256", "the open_clip student's is 512", "leave it null"),
    case("open-clip-and-preset", train(*NO_DISTILL, "model.open_clip={model: ViT-B-32}", "model.preset=mobileclip-s0"),
         "model.preset and model.open_clip both name the student"),
    case("open-clip-unknown-tag", train(*NO_DISTILL, "model.open_clip={model: ViT-B-32, pretrained: no-such-tag}"),
         "model.open_clip.pretrained='no-such-tag'", "neither a checkpoint file nor a pretrained tag of ViT-B-32"),
    case("open-clip-weights-not-weights", lambda w: train(
        *NO_DISTILL, f"model.open_clip={{model: 'local-dir:{w.dir('arch', open_clip_config__json=TINY_OPEN_CLIP)}', "
                     f"pretrained: '{w.file('w.safetensors', 'x')}'}}")(w),
         "model.open_clip.pretrained=", "w.safetensors'", "cannot load it"),
    # prepare
    case("prepare-out-foreign", lambda w: ["prepare", "--params", PARAMS, "--out", w.dir("mine", notes__txt="x")],
         "--out=", "mine'", "['notes.txt']", "which prepare does not write"),
    case("prepare-out-a-file", lambda w: ["prepare", "--params", PARAMS, "--out", w.file("data.tar", "x")],
         "data.tar'", "a file is there"),
    case("prepare-out-under-a-file", lambda w: ["prepare", "--params", PARAMS, "--out", w.file("f") + "/data"],
         "f/data'", "is a file"),
    case("prepare-metrics-a-directory", lambda w: ["prepare", "--params", PARAMS, "--out", w.out,
                                                   "--metrics", w.dir("metrics")],
         "--metrics=", "metrics'", "is a directory"),
    case("prepare-metrics-under-a-file", lambda w: ["prepare", "--params", PARAMS, "--out", w.out,
                                                    "--metrics", w.file("m") + "/prepare.json"],
         "--metrics=", "m/prepare.json'", "is a file"),
    # teacher, reinforce, publish
    case("teacher-data-without-manifest", lambda w: ["teacher", "--params", PARAMS, "--data", w.dir("t"),
                                                     "--out", w.out], "--data=", "has no manifest.json"),
    case("teacher-val-without-manifest", lambda w: ["teacher", "--params", PARAMS, "--data", w.train,
                                                    "--val", w.dir("v"), "--out", w.out], "--val=",
         "has no manifest.json"),
    case("teacher-out-a-file", lambda w: ["teacher", "--params", PARAMS, "--data", w.train,
                                          "--out", w.file("teacher.bin", "x")], "--out=", "a file is there"),
    case("teacher-labels-not-in-data", lambda w: ["teacher", "--params", PARAMS, "--data", w.train, "--out", w.out,
                                                  "--set", "teacher.train.pretrain_labels=[texture]"],
         "teacher pretrain_labels: 'texture' is not in the training samples' metadata", "pretrain_steps=0"),
    case("pretrain-a-coca", train("teacher.train.kind=coca", "teacher.train.tower=null", "teacher.train.embed_dim=256"),
         "pretrain_steps=300", "tower pretraining is for a timm tower"),
    case("lock-a-random-tower", train("teacher.train.pretrain_steps=0"), "lock_tower=true needs pretrain_steps > 0"),
    case("reinforce-data-without-manifest", lambda w: ["reinforce", "--params", PARAMS, "--data", w.dir("r"),
                                                       "--teacher", w.dir("teacher"), "--out", w.out],
         "--data=", "has no manifest.json"),
    case("reinforce-teacher-missing", lambda w: ["reinforce", "--params", PARAMS, "--data", w.train,
                                                 "--teacher", str(w.root / "no-teacher"), "--out", w.out],
         "--teacher=", "no-teacher'", "does not exist"),
    case("reinforce-shards-malformed", lambda w: ["reinforce", "--params", PARAMS, "--data", w.train,
                                                  "--teacher", w.dir("teacher"), "--out", w.out, "--shards", "a-b"],
         "--shards='a-b'", "START:END"),
    case("reinforce-out-under-a-file", lambda w: ["reinforce", "--params", PARAMS, "--data", w.train,
                                                  "--teacher", w.dir("teacher"), "--out", w.file("r") + "/train"],
         "--out=", "is a file"),
    case("publish-data-without-manifest", lambda w: ["publish-reinforced", "--params", PARAMS, "--data", w.dir("p"),
                                                     "--out", w.out], "--data=", "has no manifest.json"),
    case("index-data-missing", lambda w: ["index-reinforced", "--params", PARAMS, "--data", str(w.root / "none"),
                                          "--dims", "8", "--scales", "1", "--image-size", "16"],
         "--data=", "none'", "does not exist"),
    # export, evaluate, register
    case("export-checkpoint-missing", lambda w: ["export", "--params", PARAMS, "--checkpoint",
                                                 str(w.root / "final.pt"), "--out", w.out],
         "--checkpoint=", "final.pt'", "does not exist"),
    case("export-checkpoint-a-directory", lambda w: ["export", "--params", PARAMS, "--checkpoint", w.dir("ckpt"),
                                                     "--out", w.out], "--checkpoint=", "is a directory"),
    case("export-out-a-file", lambda w: ["export", "--params", PARAMS, "--checkpoint", w.file("final.pt", "x"),
                                         "--out", w.file("export.onnx", "x")], "--out=", "a file is there"),
    case("export-wise-ft-without-start-weights", lambda w: [
        "export", "--params", PARAMS, "--set", "export.wise_ft_alpha=0.5", "--checkpoint",
        w.file("final.pt", saved({"model": {}, "model_config": {}})), "--out", w.out],
         "export.wise_ft_alpha=0.5", "final.pt'", "no start weights", "model.init_from", "allowed: 1.0"),
    case("export-wise-ft-unreadable-checkpoint", lambda w: [
        "export", "--params", PARAMS, "--set", "export.wise_ft_alpha=0.5", "--checkpoint", w.file("final.pt", "x"),
        "--out", w.out], "--checkpoint=", "final.pt'", "not a readable training checkpoint"),
    case("nan-wise-ft-alpha", train("export.wise_ft_alpha=.nan"), "export.wise_ft_alpha=nan", "finite"),
    case("wise-ft-alpha-above-one", train("export.wise_ft_alpha=1.5"), "export.wise_ft_alpha=1.5",
         "less than or equal to 1"),
    case("wise-ft-alpha-negative", train("export.wise_ft_alpha=-0.1"), "export.wise_ft_alpha=-0.1",
         "greater than or equal to 0"),
    case("evaluate-model-without-config", lambda w: ["evaluate", "--params", PARAMS, "--model", w.dir("export"),
                                                     "--data", w.test, "--out", w.out],
         "--model=", "has no config.json"),
    case("evaluate-data-without-manifest", lambda w: ["evaluate", "--params", PARAMS,
                                                      "--model", w.dir("export", config__json="{}"),
                                                      "--data", w.dir("test"), "--out", w.out],
         "--data=", "has no manifest.json"),
    case("evaluate-unknown-task", lambda w: ["evaluate", "--params", PARAMS, "--set", "evaluate.tasks=[nope]",
                                             "--model", w.dir("export", config__json="{}"), "--data", w.test,
                                             "--out", w.out], "evaluate.tasks", "'nope'", "available"),
    case("evaluate-train-log-missing", lambda w: ["evaluate", "--params", PARAMS,
                                                  "--model", w.dir("export", config__json="{}"), "--data", w.test,
                                                  "--train-log", str(w.root / "log.csv"), "--out", w.out],
         "--train-log=", "does not exist"),
    case("evaluate-out-a-file", lambda w: ["evaluate", "--params", PARAMS,
                                           "--model", w.dir("export", config__json="{}"), "--data", w.test,
                                           "--out", w.file("eval.json", "x")], "--out=", "a file is there"),
    case("register-model-without-config", lambda w: ["register", "--params", PARAMS, "--model", w.dir("export"),
                                                     "--eval", w.dir("eval", metrics__json="{}"), "--out", w.out],
         "--model=", "has no config.json"),
    case("register-eval-without-metrics", lambda w: ["register", "--params", PARAMS,
                                                     "--model", w.dir("export", config__json="{}"),
                                                     "--eval", w.dir("eval"), "--out", w.out],
         "--eval=", "has no metrics.json"),
    case("register-out-under-a-file", lambda w: ["register", "--params", PARAMS, "--model", w.dir("export"),
                                                 "--eval", w.dir("eval"), "--out", w.file("reg") + "/out"],
         "--out=", "is a file"),
    # trainjob loads its params through the same loader
    case("trainjob-bool-max-steps", lambda w: ["trainjob", "--params", PARAMS, "--set", "train.max_steps=true",
                                               *TRAINJOB], "train.max_steps=True", "integer"),
    case("trainjob-params-not-utf8", lambda w: ["trainjob", "--params", w.file("p.yaml", b"\xff"), *TRAINJOB],
         "p.yaml' is not UTF-8"),
    case("trainjob-params-duplicate", lambda w: ["trainjob", "--params", w.file("p.yaml", "train: {}\ntrain: {}\n"),
                                                 *TRAINJOB], "duplicate key 'train'"),
    case("trainjob-set-unclosed", lambda w: ["trainjob", "--params", PARAMS, "--set", "train.lr=[", *TRAINJOB],
         "override 'train.lr=['"),
]


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A working directory to watch, logs beside it, and an MLflow store that must stay empty; StageRun entries
    are recorded."""
    work, store = tmp_path / "work", tmp_path / "mlflow"
    work.mkdir()
    store.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LIGHTCLIP_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    opened: list[str] = []
    enter = StageRun.__enter__
    monkeypatch.setattr(StageRun, "__enter__", lambda self: (opened.append(self.stage), enter(self))[1])
    return work, store, opened


@pytest.mark.parametrize("argv,fragments", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2_before_any_work(argv, fragments, split, isolated, capsys):
    work, store, opened = isolated
    args = argv(Workspace(work, split))
    before, split_before = tree(work), tree(split)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"lightclip {args[0]}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert tree(work) == before and not Path(work / "out").exists()  # nothing created, under --out or elsewhere
    assert tree(split) == split_before
    assert opened == [] and list(store.iterdir()) == []  # no MLflow run, not even a store


def test_the_table_is_large():
    assert len(BAD_INPUTS) >= 60


SUBPROCESS_CASES = [
    pytest.param(lambda w: ["train", "--params", PARAMS, "--set", "train.lr=[", "--data", w.train, "--out", w.out],
                 "override 'train.lr=['", id="set-unclosed-list"),
    pytest.param(lambda w: ["train", "--params", w.file("p.yaml", b"train:\n  lr: \xff\n"), "--data", w.train,
                            "--out", w.out], "is not UTF-8", id="params-not-utf8"),
    pytest.param(lambda w: ["prepare", "--params", PARAMS, "--out", w.dir("mine", notes__txt="x")],
                 "which prepare does not write", id="prepare-out-foreign"),
]


@pytest.mark.parametrize("argv,fragment", SUBPROCESS_CASES)
def test_the_console_command_shows_no_traceback(argv, fragment, split, tmp_path):
    work, store = tmp_path / "work", tmp_path / "mlflow"
    work.mkdir()
    store.mkdir()
    args = argv(Workspace(work, split))
    before = tree(work)
    env = {**os.environ, "LIGHTCLIP_LOG_DIR": str(tmp_path / "logs"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    result = subprocess.run([sys.executable, "-m", "lightclip_core.cli", *args], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr
    assert result.stdout == ""
    assert tree(work) == before and list(store.iterdir()) == []


def test_a_bug_in_a_stage_keeps_its_traceback(isolated, monkeypatch):
    """Only deliberate errors become exit code 2: an unexpected exception propagates (the console shows it)."""
    def broken(**_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(stages, "run_prepare", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["prepare", "--params", PARAMS, "--out", "data"])


def test_a_bug_while_loading_params_keeps_its_traceback(isolated, monkeypatch):
    import lightclip_core.infra.params_file as params_file

    def broken(text):
        raise TypeError("a bug in the loader")

    monkeypatch.setattr(params_file, "load_yaml", broken)
    with pytest.raises(TypeError, match="a bug in the loader"):
        main(["prepare", "--params", PARAMS, "--out", "data"])
