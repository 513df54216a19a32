"""Benchmark sets in the evaluate stage (issue #19, item 1): sets written (helpers_benchmark_sets.py) in CLIP_benchmark's WebDataset layout
(with webdataset's own ShardWriter, as CLIP_benchmark's exporter writes them), as a class-folder tree, as COCO and as
Karpathy caption JSON are read the same; their metrics equal a brute-force evaluation of the exported model; a missing
or malformed set stops the command with one line before any model is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_benchmark_sets import (CAPTIONED, CLASSES, LABELLED, TEMPLATES_C, write_coco,
                                    write_imagefolder, write_karpathy, write_wds)
from PIL import Image

from lightclip_core.cli import main
from lightclip_core.config import Config, ConfigError
from lightclip_core.data.skips import DataError
from lightclip_core.evaluate.benchmarks import open_benchmark
from lightclip_core.evaluate.evaluation import evaluate
from lightclip_core.export.exporter import export
from lightclip_core.export.load import load_exported
from lightclip_core.models.clip import CLIP
from lightclip_core.train.checkpoint import save_checkpoint

TINY_MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchmark-sets")
    return {"wds_cls": write_wds(root / "wds_cls", LABELLED, retrieval=False),
            "wds_ret": write_wds(root / "wds_ret", CAPTIONED, retrieval=True, maxcount=3),
            "folder": write_imagefolder(root / "folder"), "coco": write_coco(root / "coco"),
            "karpathy": write_karpathy(root / "karpathy")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Config, Path, Path]:
    """A tiny exported model and the tiny test split the stage also evaluates."""
    from lightclip_core.data.prepare import prepare

    root = tmp_path_factory.mktemp("benchmark-model")
    cfg = Config.model_validate({"model": TINY_MODEL, "export": {"onnx": False},
                                 "evaluate": {"batch_size": 4, "recall_at": [1, 2]},
                                 "data": {"samples_per_shard": 16, "synthetic": {"num_train": 16, "num_val": 4,
                                                                                  "num_test": 8, "image_size": 16}}})
    torch.manual_seed(0)
    model = CLIP(cfg.model)
    state = {"model": model.state_dict(), "model_config": cfg.model.model_dump(mode="json"), "step": 1}
    export(cfg, save_checkpoint(root / "final.pt", state), root / "export")
    prepare(cfg.data, root / "data")
    return cfg, root / "export", root / "data" / "test"


def with_sets(cfg: Config, *specs: dict) -> Config:
    return Config.model_validate({**cfg.model_dump(mode="json"),
                                  "evaluate": {**cfg.evaluate.model_dump(mode="json"), "benchmarks": list(specs)}})


# ----------------------------------------------------------------------------------- brute-force references
def reference_classification(export_dir: Path, samples, classes, templates) -> dict[str, float]:
    """Zero-shot top-1/top-5 by loops over the exported model's own encoders."""
    model = load_exported(export_dir)
    images = model.encode_image([im for im, _ in samples])
    weights = []
    for name in classes:
        prompts = [F.normalize(model.encode_text(t.replace("{c}", name)), dim=-1)[0] for t in templates]
        weights.append(F.normalize(torch.stack(prompts).mean(0), dim=-1))
    logits = images @ torch.stack(weights).T
    ranks = [int((logits[i] > logits[i, label]).sum()) for i, (_, label) in enumerate(samples)]
    return {"top1": float(np.mean([r < 1 for r in ranks])), "top5": float(np.mean([r < 5 for r in ranks]))}


def reference_retrieval(export_dir: Path, samples, k: int) -> dict[str, float]:
    """Strict and text-equivalent R@k in both directions, by loops."""
    model = load_exported(export_dir)
    images = model.encode_image([im for im, _ in samples])
    texts = [c for _, caps in samples for c in caps]
    owner = [i for i, (_, caps) in enumerate(samples) for _ in caps]
    sim = images @ model.encode_text(texts).T  # [images, texts]
    norm = [" ".join(t.lower().split()) for t in texts]
    out = {}
    i2t = [sim[i].topk(k).indices.tolist() for i in range(len(samples))]
    t2i = [sim[:, j].topk(min(k, len(samples))).indices.tolist() for j in range(len(texts))]
    out["retrieval/image_to_text"] = np.mean([any(owner[j] == i for j in top) for i, top in enumerate(i2t)])
    out["retrieval/text_to_image"] = np.mean([owner[j] in top for j, top in enumerate(t2i)])
    own_texts = [{norm[j] for j in range(len(texts)) if owner[j] == i} for i in range(len(samples))]
    out["retrieval_text_equivalent/image_to_text"] = np.mean(
        [any(norm[j] in own_texts[i] for j in top) for i, top in enumerate(i2t)])
    out["retrieval_text_equivalent/text_to_image"] = np.mean(
        [any(norm[j] in own_texts[i] for i in top) for j, top in enumerate(t2i)])
    return {f"{key}/R@{k}": float(v) for key, v in out.items()}


# ----------------------------------------------------------------------------------- the tests
def test_classification_sets_match_brute_force_in_both_layouts(exported, sets, tmp_path) -> None:
    cfg, export_dir, test_dir = exported
    cfg = with_sets(cfg, {"name": "wds", "format": "wds", "path": str(sets["wds_cls"])},
                    {"name": "folder", "format": "imagefolder", "path": str(sets["folder"])})
    metrics = evaluate(cfg, export_dir, test_dir, tmp_path / "eval").metrics
    expected = reference_classification(export_dir, LABELLED, CLASSES, TEMPLATES_C)
    for name in ("wds", "folder"):  # the same images (lossless webp and png), the same class names and prompts
        assert metrics[f"benchmark/{name}/num_images"] == len(LABELLED)
        assert metrics[f"benchmark/{name}/top1"] == pytest.approx(expected["top1"])
        assert metrics[f"benchmark/{name}/top5"] == pytest.approx(expected["top5"]) == 1.0  # 3 classes
        assert 0 <= metrics[f"benchmark/{name}/mean_per_class_recall"] <= 1
    assert "zeroshot/colour/top1" in metrics  # the test split is still evaluated


def test_retrieval_sets_match_brute_force_in_three_layouts(exported, sets, tmp_path) -> None:
    cfg, export_dir, test_dir = exported
    cfg = with_sets(cfg, {"name": "wds", "format": "wds", "path": str(sets["wds_ret"])},
                    {"name": "coco", "format": "coco", "path": str(sets["coco"]),
                     "images_dir": str(sets["coco"].parent / "images")},
                    {"name": "flickr", "format": "karpathy", "path": str(sets["karpathy"]),
                     "images_dir": str(sets["karpathy"].parent / "flickr")})
    metrics = evaluate(cfg, export_dir, test_dir, tmp_path / "eval").metrics
    for name in ("wds", "coco", "flickr"):
        assert metrics[f"benchmark/{name}/num_images"] == 4 and metrics[f"benchmark/{name}/num_captions"] == 8
        samples = CAPTIONED if name == "wds" else jpeg_files(name, sets)  # lossless webp, or the JPEGs written
        for k in (1, 2):
            for key, value in reference_retrieval(export_dir, samples, k).items():
                assert metrics[f"benchmark/{name}/{key}"] == pytest.approx(value), (name, key)


def jpeg_files(name: str, sets) -> list:
    """The JPEG files a caption-JSON set holds, with their captions."""
    folder = sets["coco"].parent / "images" if name == "coco" else sets["karpathy"].parent / "flickr" / "imgs"
    return [(Image.open(f).convert("RGB"), caps) for f, (_, caps) in zip(sorted(folder.iterdir()), CAPTIONED)]


def test_sets_reach_the_report_and_benchmarks_json(exported, sets, tmp_path) -> None:
    cfg, export_dir, test_dir = exported
    cfg = with_sets(cfg, {"name": "shapes", "format": "wds", "path": str(sets["wds_cls"])},
                    {"name": "captions", "format": "coco", "path": str(sets["coco"]),
                     "images_dir": str(sets["coco"].parent / "images")})
    result = evaluate(cfg, export_dir, test_dir, tmp_path / "eval")
    report = result.report["markdown"].read_text()
    assert "## Benchmark sets" in report and "| shapes | `wds`" in report and "**captions** (`coco`" in report
    assert "**shapes** zero-shot top-1" in report.split("## Summary")[1].split("##")[0]
    described = json.loads((tmp_path / "eval" / "benchmarks.json").read_text())
    assert described["shapes"]["classes"] == CLASSES
    assert described["shapes"]["templates"] == [t.replace("{c}", "{}") for t in TEMPLATES_C]
    assert described["captions"]["kind"] == "retrieval"
    written = json.loads(result.metrics_path.read_text())
    assert {k for k in written if k.startswith("benchmark/")} == {k for k in result.metrics if
                                                                   k.startswith("benchmark/")}


def test_damaged_images_are_skipped_counted_and_held_to_the_limit(exported, sets, tmp_path) -> None:
    cfg, export_dir, test_dir = exported
    folder = tmp_path / "folder"
    write_imagefolder(folder)
    first = sorted((folder / "0_red_circle").iterdir())[0]
    first.write_bytes(first.read_bytes()[:60])  # a truncated PNG
    spec = {"name": "folder", "format": "imagefolder", "path": str(folder)}
    tolerant = with_sets(cfg, spec).model_copy(update={"data": cfg.data.model_copy(update={"max_skip_fraction": 0.2})})
    result = evaluate(tolerant, export_dir, test_dir, tmp_path / "eval")
    assert result.metrics["benchmark/folder/num_images"] == len(LABELLED) - 1
    assert result.skipped["benchmark/folder/skipped/undecodable_image"] == 1
    strict = tolerant.model_copy(update={"data": cfg.data.model_copy(update={"max_skip_fraction": 0.0})})
    with pytest.raises(DataError, match=r"evaluate.benchmarks\[folder\].*undecodable_image=1"):
        evaluate(strict, export_dir, test_dir, tmp_path / "eval2")


def test_an_s3_set_gives_the_local_metrics(exported, sets, s3_env, tmp_path) -> None:
    from lightclip_core import stages
    from lightclip_core.infra import storage

    import boto3

    cfg, export_dir, test_dir = exported
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="bench")
    for file in sorted(sets["wds_cls"].rglob("*")):
        if file.is_file():
            storage.upload_file(file, f"s3://bench/sets/cls/{file.relative_to(sets['wds_cls']).as_posix()}")
    storage.upload_file(sets["coco"], "s3://bench/sets/coco/captions.json")
    for file in (sets["coco"].parent / "images").iterdir():
        storage.upload_file(file, f"s3://bench/sets/coco/images/{file.name}")
    local = with_sets(cfg, {"name": "cls", "format": "wds", "path": str(sets["wds_cls"])},
                      {"name": "coco", "format": "coco", "path": str(sets["coco"]),
                       "images_dir": str(sets["coco"].parent / "images")})
    remote = with_sets(cfg, {"name": "cls", "format": "wds", "path": "s3://bench/sets/cls"},
                       {"name": "coco", "format": "coco", "path": "s3://bench/sets/coco/captions.json",
                        "images_dir": "s3://bench/sets/coco/images"})
    off = {"tracking": {"enabled": False}}
    local, remote = (Config.model_validate({**c.model_dump(mode="json"), **off}) for c in (local, remote))
    expected = stages.run_evaluate(cfg=local, model=export_dir, data=test_dir, out=tmp_path / "local").metrics
    got = stages.run_evaluate(cfg=remote, model=export_dir, data=test_dir, out=tmp_path / "remote").metrics
    bench = {k: v for k, v in expected.items() if k.startswith("benchmark/")}
    assert bench and {k: got[k] for k in bench} == bench


# ----------------------------------------------------------------------------------- bad sets
def _broken(kind: str, root: Path, sets: dict[str, Path]) -> dict:
    """A spec whose set is broken in one way (written under `root`), and nothing else wrong."""
    import shutil

    def copy(name: str) -> Path:
        return Path(shutil.copytree(sets[name], root / name))
    if kind == "missing":
        return {"format": "wds", "path": str(root / "nowhere")}
    if kind == "no-nshards":
        (copy("wds_cls") / "test" / "nshards.txt").unlink()
        return {"format": "wds", "path": str(root / "wds_cls")}
    if kind == "nshards-not-a-number":
        (copy("wds_cls") / "test" / "nshards.txt").write_text("three\n")
        return {"format": "wds", "path": str(root / "wds_cls")}
    if kind == "shard-missing":
        (copy("wds_cls") / "test" / "nshards.txt").write_text("5\n")
        return {"format": "wds", "path": str(root / "wds_cls")}
    if kind == "no-classnames":
        (copy("wds_cls") / "classnames.txt").unlink()
        return {"format": "wds", "path": str(root / "wds_cls")}
    if kind == "multilabel":
        (copy("wds_cls") / "dataset_type.txt").write_text("multilabel\n")
        return {"format": "wds", "path": str(root / "wds_cls")}
    if kind == "template-without-slot":
        (copy("wds_cls") / "zeroshot_classification_templates.txt").write_text("a photo.\n")
        return {"format": "wds", "path": str(root / "wds_cls")}
    if kind == "folder-names-mismatch":
        (copy("folder") / "classnames.txt").write_text("one\ntwo\n")
        return {"format": "imagefolder", "path": str(root / "folder")}
    if kind == "coco-not-json":
        (root / "bad.json").write_text("{not json")
        return {"format": "coco", "path": str(root / "bad.json")}
    if kind == "coco-no-annotations":
        (root / "bad.json").write_text(json.dumps({"images": []}))
        return {"format": "coco", "path": str(root / "bad.json")}
    if kind == "karpathy-no-such-split":
        return {"format": "karpathy", "path": str(sets["karpathy"]), "split": "val"}
    raise AssertionError(kind)


BAD_SETS = [("missing", "does not exist"), ("no-nshards", "no test/nshards.txt"),
            ("nshards-not-a-number", "'three', not a number"), ("shard-missing", "3.tar is missing"),
            ("no-classnames", "needs classnames.txt"), ("multilabel", "'multilabel'"),
            ("template-without-slot", "'a photo.'"), ("folder-names-mismatch", "2 class names for 3"),
            ("coco-not-json", "not a readable JSON"), ("coco-no-annotations", "'annotations' list"),
            ("karpathy-no-such-split", "its splits: ['test', 'train']")]


@pytest.mark.parametrize("kind,fragment", BAD_SETS, ids=[k for k, _ in BAD_SETS])
def test_a_bad_set_is_one_line_and_exit_2_before_the_model_loads(kind, fragment, exported, sets, tmp_path,
                                                                 capsys, monkeypatch) -> None:
    cfg, export_dir, test_dir = exported
    spec = {"name": "bad", **_broken(kind, tmp_path, sets)}
    with pytest.raises(ConfigError, match="evaluate.benchmarks") as err:
        open_benchmark(Config.model_validate({"evaluate": {"benchmarks": [spec]}}).evaluate.benchmarks[0], ["{}"])
    assert fragment in str(err.value) and "\n" not in str(err.value)

    import lightclip_core.evaluate.evaluation as evaluation
    monkeypatch.setattr(evaluation, "load_exported", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"model": TINY_MODEL, "evaluate": {"benchmarks": [spec]}}))
    capsys.readouterr()
    code = main(["evaluate", "--params", str(params), "--model", str(export_dir), "--data", str(test_dir),
                 "--out", str(tmp_path / "eval")])
    err_text = capsys.readouterr().err
    assert code == 2 and len(err_text.splitlines()) == 1 and fragment in err_text, err_text
    assert not (tmp_path / "eval").exists() and not (tmp_path / "mlflow.db").exists()


BAD_SPECS = [({"name": "a b", "format": "wds", "path": "x"}, "benchmarks[0].name='a b'"),
             ({"name": "x", "format": "csv", "path": "x"}, "benchmarks[0].format='csv'"),
             ({"name": "x", "format": "wds", "path": "x", "images_dir": "y"}, "images_dir is for the coco"),
             ({"name": "x", "format": "coco", "path": "x", "templates": ["a {}"]}, "a coco set is for retrieval"),
             ({"name": "x", "format": "wds", "path": "x", "templates": ["plain"]}, "'plain' has no"),
             ({"name": "x", "format": "wds", "path": ""}, "benchmarks[0].path=''")]


@pytest.mark.parametrize("spec,fragment", BAD_SPECS, ids=[f[:24] for _, f in BAD_SPECS])
def test_a_bad_spec_is_a_one_line_config_error(spec, fragment) -> None:
    from lightclip_core.config import validate

    with pytest.raises(ConfigError) as err:
        validate({"evaluate": {"benchmarks": [spec]}})
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_names_are_unique_and_the_gate_may_name_only_a_configured_set() -> None:
    from lightclip_core.config import validate

    one = {"name": "imnet", "format": "wds", "path": "x"}
    with pytest.raises(ConfigError, match="'imnet' is used twice"):
        validate({"evaluate": {"benchmarks": [one, one]}})
    with pytest.raises(ConfigError, match=r"registry.gate_metric='benchmark/other/top1'.*configured: \['imnet'\]"):
        validate({"evaluate": {"benchmarks": [one]}, "registry": {"gate_metric": "benchmark/other/top1"}})
    assert validate({"evaluate": {"benchmarks": [one]}, "registry": {"gate_metric": "benchmark/imnet/top1"}})


def test_a_wise_ft_curve_of_a_plain_export_is_refused_before_the_mlflow_run(exported, tmp_path, capsys,
                                                                            monkeypatch) -> None:
    _, export_dir, test_dir = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"model": TINY_MODEL, "evaluate": {"wise_ft_alphas": [0.5]}}))
    capsys.readouterr()
    code = main(["evaluate", "--params", str(params), "--model", str(export_dir), "--data", str(test_dir),
                 "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "no WiSE-FT endpoints" in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "mlflow.db").exists()
