"""Named model presets: selectable from params.yaml, filling only the fields left unset, and every preset's model
folds for inference without changing its embeddings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_reparam import randomize_statistics

from lightclip_core.config import Config, ConfigError, ModelConfig, load_config
from lightclip_core.export.reparam import parameter_count, reparameterize
from lightclip_core.models import build_model
from lightclip_core.models.registry import list_presets, register_preset
from lightclip_core.models.tokenizer import tokenize

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["lightclip-effb0-s", "lightclip-mnv2-s", "mobileclip-s0", "mobileclip-s1", "mobileclip-s2"]


def test_registry_lists_the_lightclip_and_mobileclip_presets() -> None:
    assert list_presets() == PRESETS


def test_the_embedded_default_model_is_unchanged() -> None:
    model = Config().model
    assert model.preset is None and model.embed_dim == 256
    assert (model.image.tower, model.image.size, model.image.interpolation) == ("repvit_m0_9", 64, "bilinear")
    text = model.text
    assert (text.kind, text.context_length, text.width, text.heads, text.layers, text.causal) == \
        ("transformer", 32, 256, 4, 4, True)


def test_a_preset_set_on_params_yaml_fills_the_unset_fields() -> None:
    model = load_config(ROOT / "params.yaml", ["model.preset=mobileclip-s0"]).model
    assert (model.image.tower, model.image.size, model.image.mean, model.image.std) == \
        ("fastvit_mci0", 256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert (model.text.kind, model.text.layers, model.text.mixer_kernel, model.text.causal) == ("mct", 4, 11, False)
    assert model.init_logit_scale == Config().model.init_logit_scale  # set in params.yaml, not by the preset


def test_explicit_values_override_the_preset() -> None:
    model = load_config(ROOT / "params.yaml", ["model.preset=mobileclip-s1", "model.image.size=128",
                                               "model.text.layers=2"]).model
    assert (model.image.tower, model.image.size, model.text.layers) == ("fastvit_mci1", 128, 2)


def test_any_timm_tower_still_works_by_name() -> None:
    model = load_config(ROOT / "params.yaml", ["model.image.tower=resnet18"]).model
    assert model.image.tower == "resnet18" and model.preset is None


def test_unknown_preset_is_one_line_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["model.preset=mobileclip-s9"])
    message = str(err.value)
    assert "\n" not in message and "model.preset='mobileclip-s9'" in message
    assert all(name in message for name in PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_a_checkpointed_preset_config_validates_to_itself(name: str) -> None:
    model = ModelConfig(preset=name)
    assert ModelConfig.model_validate(model.model_dump(mode="json")) == model


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="twice"):
        register_preset("mobileclip-s0")(dict)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_model_folds_without_changing_its_embeddings(name: str) -> None:
    """Small inputs keep this fast: 64 px images and the first 12 token positions (padding beyond them)."""
    torch.manual_seed(0)
    model = randomize_statistics(build_model(ModelConfig(preset=name))).eval()
    images = torch.rand(2, 3, 64, 64)
    tokens = tokenize(["a red circle", "two small blue squares on a grey background"], 77)[:, :12]
    with torch.no_grad():
        unfolded = model.encode_image(images), model.encode_text(tokens)
        before = parameter_count(model)
        reparameterize(model)
        folded = model.encode_image(images), model.encode_text(tokens)
    for a, b in zip(unfolded, folded, strict=True):
        assert (a - b).abs().max().item() <= 1e-5
    assert parameter_count(model) < before if name.startswith("mobileclip") else parameter_count(model) == before
