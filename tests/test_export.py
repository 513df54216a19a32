"""Export stage: safetensors round trip, ONNX parity at two batch sizes, config-only rebuild, preprocessing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from lightclip_core.config import Config
from lightclip_core.data.tokenizer import tokenize
from lightclip_core.export.exporter import (ExportParityError, check_parity, export, measure_parity,
                                            parity_inputs, write_weights)
from lightclip_core.export.load import build_model_from_config, load_exported
from lightclip_core.models.clip import CLIP
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
    assert names == ["config.json", "image_encoder.onnx", "model.safetensors", "parity.json", "text_encoder.onnx"]
    assert result.param_count == sum(p.numel() for p in model.parameters())
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


def test_onnx_parity_at_two_batch_sizes(exported) -> None:
    cfg, _, result = exported
    assert set(result.parity) == {"image_encoder", "text_encoder"}
    for per_batch in result.parity.values():
        assert set(per_batch) == {"batch_3", "batch_1"}
        assert max(per_batch.values()) <= 1e-4
    report = json.loads(result.files["parity"].read_text())
    assert report["max_abs_diff"] == result.parity
    assert report["tolerance"] == cfg.export.parity_tolerance


def test_onnx_batch_axis_is_dynamic_and_outputs_are_normalised(exported) -> None:
    _, model, result = exported
    images, texts = sample_inputs(model, batch=5)  # a batch size neither export nor parity used
    for name, x in (("image_encoder", images), ("text_encoder", texts)):
        session = ort.InferenceSession(str(result.files[name]), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert isinstance(inp.shape[0], str) and out.name == "embedding"
        (emb,) = session.run(None, {inp.name: x.numpy()})
        assert emb.shape == (5, 16)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_tampered_onnx_fails_parity(exported, tmp_path: Path) -> None:
    _, model, result = exported
    tampered = tmp_path / "text_encoder.onnx"
    shutil.copy(result.files["text_encoder"], tampered)
    proto = onnx.load(str(tampered))
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(biggest).copy()
    array += np.float32(0.05) * np.random.default_rng(0).standard_normal(array.shape).astype(array.dtype)
    biggest.CopyFrom(onnx.numpy_helper.from_array(array, biggest.name))
    onnx.save(proto, str(tampered))
    parity = measure_parity(model, {"text_encoder": tampered}, batch=3)
    with pytest.raises(ExportParityError, match="text_encoder") as err:
        check_parity(parity, tolerance=1e-4)
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
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert result.parity == {}
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
