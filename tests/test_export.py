"""Export stage: reparameterized safetensors, torch.export and ONNX round trips with parity at two batch sizes,
config-only rebuild, preprocessing and tokenizer metadata, and the inference API in a process without training code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn

from lightclip_core.config import Config
from lightclip_core.export.exporter import (ExportParityError, check_parity, export, measure_parity, onnx_runners,
                                            parity_inputs, pytorch_runners, reference_outputs, write_weights)
from lightclip_core.export.load import build_model_from_config, load_exported
from lightclip_core.models.clip import CLIP
from lightclip_core.models.tokenizer import tokenize
from lightclip_core.train.checkpoint import save_checkpoint

TINY_MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}


def tiny_config(**export: object) -> Config:
    return Config.model_validate({"model": TINY_MODEL, "export": {"parity_batch": 3, **export}})


def trained_looking_model(cfg: Config) -> CLIP:
    """A fresh model whose BatchNorm statistics are not the identity, so train-mode mistakes would show."""
    torch.manual_seed(0)
    model = CLIP(cfg.model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_tiny_checkpoint(model: CLIP, cfg: Config, path: Path, step: int = 42) -> Path:
    state = {"model": model.state_dict(), "model_config": cfg.model.model_dump(mode="json"), "step": step}
    return save_checkpoint(path, state)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """One ONNX export shared by the tests of this module (the dynamo exporter takes seconds)."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config()
    model = trained_looking_model(cfg)
    ckpt = save_tiny_checkpoint(model, cfg, root / "final.pt")
    result = export(cfg, ckpt, root / "out")
    return cfg, model, result


def sample_inputs(model: CLIP, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = parity_inputs(model, batch, seed=1)
    return inputs["image"], inputs["text"]


def test_writes_expected_files(exported) -> None:
    _, model, result = exported
    names = sorted(p.name for p in result.out_dir.iterdir() if not p.name.startswith("."))
    assert names == ["bpe_simple_vocab_16e6.txt.gz", "config.json", "image_encoder.onnx", "image_encoder.pt2",
                     "model.safetensors", "parity.json", "text_encoder.onnx", "text_encoder.pt2"]
    assert result.param_count == result.param_count_unfused == sum(p.numel() for p in model.parameters())
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["source"]["checkpoint_step"] == 42
    assert config["param_count"] == result.param_count
    assert config["tokenizer"]["context_length"] == 16
    assert config["preprocess"]["size"] == 32


def test_safetensors_reload_matches_original(exported) -> None:
    _, model, result = exported
    loaded = load_exported(result.out_dir)
    assert not loaded.model.training
    images, texts = sample_inputs(model)
    with torch.inference_mode():
        assert torch.equal(loaded.model.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.model.encode_text(texts), model.encode_text(texts))
        assert torch.equal(loaded.model.scale(), model.scale())


def test_every_format_has_parity_at_two_batch_sizes(exported) -> None:
    cfg, _, result = exported
    assert set(result.parity) == {"reparameterized", "torch_export", "onnx"}
    for per_encoder in result.parity.values():
        assert set(per_encoder) == {"image_encoder", "text_encoder"}
        for per_batch in per_encoder.values():
            assert set(per_batch) == {"batch_3", "batch_1"}
            assert max(per_batch.values()) <= 1e-4
    report = json.loads(result.files["parity"].read_text())
    assert report["max_abs_diff"] == result.parity
    assert report["tolerance"] == cfg.export.parity_tolerance


def test_onnx_batch_axis_is_dynamic_and_outputs_are_normalised(exported) -> None:
    _, model, result = exported
    images, texts = sample_inputs(model, batch=5)  # a batch size neither export nor parity used
    for name, x in (("image_encoder", images), ("text_encoder", texts)):
        session = ort.InferenceSession(str(result.files[f"{name}.onnx"]), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert isinstance(inp.shape[0], str) and out.name == "embedding"
        (emb,) = session.run(None, {inp.name: x.numpy()})
        assert emb.shape == (5, 16)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_tampered_onnx_fails_parity(exported, tmp_path: Path) -> None:
    _, model, result = exported
    tampered = tmp_path / "text_encoder.onnx"
    shutil.copy(result.files["text_encoder.onnx"], tampered)
    proto = onnx.load(str(tampered))
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(biggest).copy()
    array += np.float32(0.05) * np.random.default_rng(0).standard_normal(array.shape).astype(array.dtype)
    biggest.CopyFrom(onnx.numpy_helper.from_array(array, biggest.name))
    onnx.save(proto, str(tampered))
    inputs = parity_inputs(model, 3)
    parity = measure_parity(reference_outputs(pytorch_runners(model), inputs), onnx_runners({"text_encoder": tampered}),
                            inputs)
    with pytest.raises(ExportParityError, match="onnx parity failed: text_encoder") as err:
        check_parity({"onnx": parity}, tolerance=1e-4)
    assert "\n" not in str(err.value)


def test_too_small_tolerance_fails_export_after_writing_report(tmp_path: Path) -> None:
    cfg = tiny_config(parity_tolerance=1e-12)
    ckpt = save_tiny_checkpoint(trained_looking_model(cfg), cfg, tmp_path / "final.pt")
    with pytest.raises(ExportParityError, match="parity_tolerance=1e-12") as err:
        export(cfg, ckpt, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["tolerance"] == 1e-12
    assert not (tmp_path / "out" / "config.json").exists()  # a failed export is never published as loadable


def test_config_json_alone_rebuilds_the_architecture(exported) -> None:
    _, model, result = exported
    config = json.loads((result.out_dir / "config.json").read_text())
    rebuilt = build_model_from_config(config)
    assert rebuilt.cfg == model.cfg
    with safe_open(str(result.files["weights"]), framework="pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert stored == {k: list(v.shape) for k, v in rebuilt.state_dict().items()}


def test_preprocess_gives_model_input(exported) -> None:
    _, _, result = exported
    loaded = load_exported(result.out_dir)
    for image in (Image.new("RGB", (50, 40), (128, 64, 255)), Image.new("L", (20, 90), 200)):
        x = loaded.preprocess(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    mean, std = loaded.config["preprocess"]["mean"], loaded.config["preprocess"]["std"]
    x = loaded.preprocess(Image.new("RGB", (50, 40), (128, 64, 255)))
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x[:, 16, 16], expected.float())
    assert torch.equal(loaded.tokenize(["a red circle"]), tokenize(["a red circle"], 16))


def test_export_without_onnx(tmp_path: Path) -> None:
    cfg = tiny_config(onnx=False)
    ckpt = save_tiny_checkpoint(trained_looking_model(cfg), cfg, tmp_path / "final.pt", step=3)
    result = export(cfg, ckpt, tmp_path / "out")
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "config.json",
                                                                "image_encoder.pt2", "model.safetensors",
                                                                "parity.json", "text_encoder.pt2"]
    assert set(result.parity) == {"reparameterized", "torch_export"}
    assert "onnx" not in json.loads(result.files["config"].read_text())


def test_checkpoint_problems_are_reported(tmp_path: Path) -> None:
    cfg = tiny_config(onnx=False)
    model = trained_looking_model(cfg)
    torch.save({"model": model.state_dict(), "step": 1}, tmp_path / "no_config.pt")
    with pytest.raises(ValueError, match="model_config"):
        export(cfg, tmp_path / "no_config.pt", tmp_path / "out")
    state = {**model.state_dict(), "unexpected.weight": torch.zeros(1)}
    torch.save({"model": state, "model_config": cfg.model.model_dump(mode="json")}, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="unexpected.weight"):
        export(cfg, tmp_path / "extra.pt", tmp_path / "out")


def test_shared_tensors_survive_the_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import load_model

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(4, 4, bias=False)
            self.decoder = nn.Linear(4, 4, bias=False)
            self.decoder.weight = self.encoder.weight

    source, target = Tied(), Tied()
    write_weights(source, tmp_path / "tied.safetensors")
    load_model(target, str(tmp_path / "tied.safetensors"), strict=True)
    assert torch.equal(target.encoder.weight, source.encoder.weight)
    assert target.decoder.weight is target.encoder.weight


def test_torch_export_programs_round_trip_with_a_dynamic_batch(exported) -> None:
    _, model, result = exported
    images, texts = sample_inputs(model, batch=5)
    with torch.inference_mode():
        for name, x, expected in (("image_encoder", images, model.encode_image(images)),
                                  ("text_encoder", texts, model.encode_text(texts))):
            program = torch.export.load(str(result.files[f"{name}.pt2"]))
            torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=0)


def test_metadata_gives_a_consumer_the_preprocessing_and_the_tokenizer(exported) -> None:
    from lightclip_core.infra.storage import sha256_file
    from lightclip_core.models.tokenizer import tokenizer_from_file

    cfg, _, result = exported
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["reparameterized"] is True and config["dropped_modules"] == []
    assert config["preprocess"] == {"size": 32, "interpolation": "bilinear", "mean": list(cfg.model.image.mean),
                                    "std": list(cfg.model.image.std), "resize_mode": "shortest",
                                    "input": "RGB, scaled to [0, 1], then (x - mean) / std, NCHW float32"}
    spec = config["tokenizer"]
    assert (spec["context_length"], spec["sot_token_id"], spec["eot_token_id"], spec["pad_token_id"]) == \
        (16, 49406, 49407, 0)
    vocab = result.out_dir / spec["vocab_file"]
    assert sha256_file(vocab) == spec["vocab_sha256"]
    captions = ["A Photo of a red circle!", "two   green triangles"]
    assert torch.equal(tokenizer_from_file(vocab, 16)(captions), tokenize(captions, 16))


def test_modules_no_encoder_reads_are_found_in_the_exported_graph() -> None:
    from lightclip_core.export.prune import drop_modules, unreachable_modules

    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.mlm_head = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))  # a training-only objective's head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    towers = Towers().eval()
    program = torch.export.export(towers, (torch.randn(2, 4),))
    assert unreachable_modules(towers, [program]) == ["mlm_head"]
    drop_modules(towers, ["mlm_head"])
    assert not hasattr(towers, "mlm_head") and towers(torch.randn(2, 4)).shape == (2, 4)


# --------------------------------------------------------------------------- a MobileCLIP-style model (folds)
MCT_MODEL = {"embed_dim": 16, "image": {"tower": "fastvit_mci0", "size": 64, "mean": [0, 0, 0], "std": [1, 1, 1]},
             "text": {"kind": "mct", "causal": False, "context_length": 16, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def mct_exported(tmp_path_factory: pytest.TempPathFactory):
    """A FastViT + MCt model with non-trivial BatchNorm statistics and layer scales, trained-looking, exported."""
    from helpers_reparam import randomize_statistics

    root = tmp_path_factory.mktemp("mct_export")
    cfg = Config.model_validate({"model": MCT_MODEL, "export": {"parity_batch": 3}})
    torch.manual_seed(0)
    model = randomize_statistics(CLIP(cfg.model)).eval()
    result = export(cfg, save_tiny_checkpoint(model, cfg, root / "final.pt"), root / "out")
    return cfg, model, result


def test_folded_export_matches_the_trained_model(mct_exported) -> None:
    _, model, result = mct_exported
    assert result.param_count < result.param_count_unfused
    loaded = load_exported(result.out_dir)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.model.text.modules())
    images, texts = sample_inputs(model, batch=3)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.model.encode_text(texts), model.encode_text(texts), atol=1e-5, rtol=0)


def test_folded_model_round_trips_through_every_format(mct_exported) -> None:
    _, model, result = mct_exported
    for per_encoder in result.parity.values():
        assert max(d for per_batch in per_encoder.values() for d in per_batch.values()) <= 1e-5
    loaded = load_exported(result.out_dir)
    images, texts = sample_inputs(model, batch=5)
    with torch.inference_mode():
        expected = {"image_encoder": loaded.model.encode_image(images), "text_encoder": loaded.model.encode_text(texts)}
    for name, x in (("image_encoder", images), ("text_encoder", texts)):
        (onnx_out,) = ort.InferenceSession(str(result.files[f"{name}.onnx"])).run(None, {name.split("_")[0]: x.numpy()})
        np.testing.assert_allclose(onnx_out, expected[name].numpy(), atol=1e-5)
        with torch.inference_mode():
            program_out = torch.export.load(str(result.files[f"{name}.pt2"])).module()(x)
        torch.testing.assert_close(program_out, expected[name], atol=1e-5, rtol=0)


FRESH_PROCESS = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[4]))  # bit-equal to the parent only with the same intra-op threads
from lightclip_core.export.load import load_exported
loaded = load_exported(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
torch.save({"image": loaded.encode_image(inputs["image"]), "text": loaded.encode_text(inputs["text"])}, sys.argv[3])
prefixes = ("lightclip_core.train", "lightclip_core.losses", "lightclip_core.export.exporter", "lightclip_core.cli",
            "lightclip_core.tracking", "lightclip_core.data.shards", "mlflow", "onnx")
print(json.dumps(sorted(m for m in sys.modules if m.startswith(prefixes))))
"""


def test_an_export_loads_in_a_fresh_process_without_training_code(mct_exported, tmp_path: Path) -> None:
    import subprocess
    import sys

    _, model, result = mct_exported
    images, texts = sample_inputs(model, batch=2)
    torch.save({"image": images, "text": texts}, tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(result.out_dir), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "outputs.pt"), str(torch.get_num_threads())], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    loaded = load_exported(result.out_dir)
    assert torch.equal(outputs["image"], loaded.encode_image(images))
    assert torch.equal(outputs["text"], loaded.encode_text(texts))


def pil_images() -> list[Image.Image]:
    return [Image.new("RGB", (80, 60), (220, 30, 30)), Image.new("RGB", (40, 90), (30, 30, 220)),
            Image.new("L", (64, 64), 128)]


def test_inference_api_embeds_strings_and_pil_images_and_classifies(mct_exported) -> None:
    _, _, result = mct_exported
    loaded = load_exported(result.out_dir)
    images, classes, templates = pil_images(), ["red", "blue", "grey"], ["a {} square.", "a photo of {}."]
    image_emb, text_emb = loaded.encode_image(images), loaded.encode_text("a red square")
    assert image_emb.shape == (3, 16) and text_emb.shape == (1, 16)
    torch.testing.assert_close(text_emb, loaded.encode_text(loaded.tokenize(["a red square"])))
    probs = loaded.zero_shot(images, classes, templates)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    expected = (loaded.model.scale() * image_emb @ loaded.classifier(classes, templates)).softmax(dim=-1)
    torch.testing.assert_close(probs, expected)


def test_clip_benchmark_interface(mct_exported) -> None:
    """CLIP_benchmark's zero-shot code path (its `zero_shot_classifier` + `run_classification`), with the
    `(model, transform, tokenizer)` triple its model loaders return."""
    _, _, result = mct_exported
    loaded = load_exported(result.out_dir)
    model, transform, tokenizer = loaded.clip_benchmark()
    classes, templates = ["red", "blue", "grey"], ["a {} square.", "a photo of {}."]
    with torch.no_grad():
        weights = []
        for name in classes:
            emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1).mean(dim=0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)
        features = F.normalize(model.encode_image(torch.stack([transform(im) for im in pil_images()])), dim=-1)
    expected = loaded.encode_image(pil_images()) @ loaded.classifier(classes, templates)
    torch.testing.assert_close(features @ classifier, expected)


def test_clip_benchmark_itself_runs_on_an_export(mct_exported) -> None:
    """CLIP_benchmark's own zero-shot functions (its `evaluate` wrapper is left out: its accuracy() breaks on
    numpy >= 2.4, see PITFALLS.md) agree with our classifier. clip-benchmark is a test dependency."""
    from clip_benchmark.metrics import zeroshot_classification as zeroshot

    _, _, result = mct_exported
    loaded = load_exported(result.out_dir)
    model, transform, tokenizer = loaded.clip_benchmark()
    classes = ["red", "blue", "grey"]
    loader = torch.utils.data.DataLoader([(transform(image), label) for label, image in enumerate(pil_images())],
                                         batch_size=2)
    classifier = zeroshot.zero_shot_classifier(model, tokenizer, classes, ["a {c} square."], "cpu", amp=False)
    logits, _ = zeroshot.run_classification(model, classifier, loader, "cpu", amp=False)
    expected = 100.0 * loaded.encode_image(pil_images()) @ loaded.classifier(classes, ["a {} square."])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
