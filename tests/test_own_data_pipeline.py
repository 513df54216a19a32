"""Own data, pretrained weights and benchmark sets through the whole DVC pipeline (issue #19): `dvc repro` in a fresh
project on a tiny class-folder dataset under data/own, an open_clip student started from an open_clip model saved
locally (`model.open_clip: {model: local-dir:...}`, open_clip's own config and weights files), one zero-shot set
in CLIP_benchmark's WebDataset layout and one COCO retrieval set, the WiSE-FT curve, and the registry gate on a
benchmark metric. Every set's metrics reach metrics.json, the DVC metrics, MLflow and the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import open_clip
import torch
import yaml
from safetensors.torch import load_file, save_file
from helpers_benchmark_sets import CAPTIONED, CLASSES, LABELLED, image, write_coco, write_wds
from helpers_project import DVC, ROOT, make_project, run
from helpers_tiny import TINY, merge

from lightclip_core.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
OWN = {"data": {"source": "imagefolder", "samples_per_shard": 64,
                "ingest": {"path": "data/own", "val_fraction": 0.15, "test_fraction": 0.2}},
       "model": {"open_clip": {"model": "local-dir:pretrained/open_clip"}},
       "evaluate": {"wise_ft_alphas": [0.0, 1.0], "benchmarks": [
           {"name": "shapes", "format": "wds", "path": "sets/shapes"},
           {"name": "captions", "format": "coco", "path": "sets/coco/captions.json",
            "images_dir": "sets/coco/images"}]},
       "registry": {"gate_metric": "benchmark/shapes/top1"}}


# an open_clip architecture of the tiny parameters' sizes (embed_dim 32, 32 px, a 2-layer text tower of width 64)
OPEN_CLIP_MODEL = {"embed_dim": 32, "custom_text": True,
                   "vision_cfg": {"timm_model_name": "mobilenetv2_050", "timm_model_pretrained": False,
                                  "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
                   "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2}}


def own_files(repo: Path) -> None:
    """The own class folders, the two benchmark sets and the saved open_clip model, in the fresh project."""
    for n in range(150):  # 50 images per class, 32 px
        name = CLASSES[n % 3]
        folder = repo / "data" / "own" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        image(*name.split(), jitter=n % 40).resize((32, 32)).save(folder / f"{n:03d}.png")
    write_wds(repo / "sets" / "shapes", LABELLED, retrieval=False)
    write_coco(repo / "sets" / "coco")
    saved = repo / "pretrained" / "open_clip"
    saved.mkdir(parents=True)
    (saved / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_MODEL}))
    torch.manual_seed(123)
    model = open_clip.create_model(f"local-dir:{saved}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(saved / "open_clip_model.safetensors"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("own-data")
    params = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), OWN)
    env = make_project(repo, params, own_files)
    run([*DVC, "repro"], repo, env)
    return repo, env


def test_the_open_clip_student_started_from_the_saved_weights(project):
    repo, _ = project
    saved = load_file(str(repo / "pretrained" / "open_clip" / "open_clip_model.safetensors"))
    final = load_checkpoint(repo / "artifacts" / "train" / "final.pt")
    assert final["lineage"]["init_from"] == "local-dir:pretrained/open_clip"
    assert final["start_model"].keys() == saved.keys()  # open_clip's own state dict
    assert all(torch.equal(final["start_model"][k], saved[k]) for k in saved)
    assert not all(torch.equal(final["model"][k], saved[k]) for k in saved)  # and then it trained
    exported = json.loads((repo / "artifacts" / "export" / "config.json").read_text())
    assert exported["wise_ft"]["init_from"] == "local-dir:pretrained/open_clip"
    assert exported["model_config"]["image"]["tower"] == "open_clip"
    reloaded = open_clip.create_model(f"local-dir:{repo / 'artifacts' / 'export'}")  # the export is open_clip's too
    assert reloaded.state_dict().keys() == saved.keys()


def test_every_set_reaches_metrics_json_the_dvc_metrics_mlflow_and_the_report(project):
    import mlflow

    repo, env = project
    wanted = {"benchmark/shapes/top1", "benchmark/shapes/top5", "benchmark/shapes/mean_per_class_recall",
              "benchmark/captions/retrieval/image_to_text/R@1", "benchmark/captions/retrieval/text_to_image/R@5",
              "benchmark/captions/retrieval_text_equivalent/image_to_text/R@1", "wise_ft/0/benchmark/shapes/top1",
              "wise_ft/1/benchmark/captions/retrieval/image_to_text/R@1", "wise_ft/0/zeroshot/class/top1"}
    metrics = json.loads((repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert wanted <= set(metrics) and metrics["benchmark/shapes/num_images"] == len(LABELLED)
    assert metrics["benchmark/captions/num_images"] == len(CAPTIONED)
    assert "zeroshot/class/top1" in metrics  # the own data's test split, its class-folder task
    shown = json.loads(run([*DVC, "metrics", "show", "--json"], repo, env))
    dvc_metrics = json.dumps(shown)
    assert all(key in dvc_metrics for key in ("benchmark/shapes/top1", "wise_ft/0/benchmark/shapes/top1"))

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("lightclip").experiment_id],
                              filter_string="tags.stage = 'evaluate'")
    logged = runs[0].data.metrics
    assert {k.replace("@", "_at_") for k in wanted} <= set(logged)
    assert logged["benchmark/shapes/top1"] == pytest.approx(metrics["benchmark/shapes/top1"])

    report = (repo / "artifacts" / "eval" / "report.md").read_text()
    assert "## Benchmark sets" in report and "| shapes | `wds` sets/shapes |" in report
    assert "**captions** (`coco` sets/coco/captions.json): 4 images, 8 captions." in report
    assert "## WiSE-FT" in report and "| 1 (exported) |" in report


def test_the_registry_gate_reads_a_benchmark_metric(project):
    import mlflow

    repo, env = project
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("lightclip", "champion")
    assert champion.tags["gate.metric"] == "benchmark/shapes/top1"
    metrics = json.loads((repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert float(champion.tags["gate.candidate_value"]) == pytest.approx(metrics["benchmark/shapes/top1"])
