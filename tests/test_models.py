"""The CLIP wrapper: timm image tower with token map, shortened text tower, clamped temperature."""
from __future__ import annotations

import torch

from lightclip_core.config import ModelConfig
from lightclip_core.data.tokenizer import tokenize
from lightclip_core.models import build_model

TINY = ModelConfig.model_validate({
    "embed_dim": 32, "image": {"tower": "mobilenetv2_050", "size": 32},
    "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 2},
})


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY).eval()


def test_embeddings_are_unit_norm_with_the_configured_dimension():
    model = tiny_model()
    out = model(torch.randn(3, 3, 32, 32), tokenize(["a red circle", "a blue square", "green"], 16))
    for key in ("image_features", "text_features"):
        assert out[key].shape == (3, 32)
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(3), atol=1e-5)


def test_image_tower_exposes_its_spatial_token_map():
    model = tiny_model()
    pooled, tokens = model.visual.forward_tokens(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, 32)
    assert tokens.shape == (2, 4, model.visual.num_features)  # 64 px / stride 32 = a 2x2 map


def test_logit_scale_is_clamped_at_100():
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) is far above 100
    assert model.scale().item() == 100.0


def test_text_embedding_ignores_padding_beyond_end_of_text():
    """Causal attention and end-of-text pooling: the same caption in a longer context gives the same embedding."""
    model = tiny_model()
    clean = tokenize(["a small red circle"], 16)
    noisy = clean.clone()
    eot = int((noisy[0] == 49407).nonzero()[0])
    noisy[0, eot + 1:] = 320  # replace the zero padding after end-of-text by real word ids
    with torch.no_grad():
        assert torch.allclose(model.encode_text(clean), model.encode_text(noisy), atol=1e-6)


def test_no_weight_decay_covers_biases_norms_embeddings_and_temperature():
    model = tiny_model()
    skip = model.no_weight_decay()
    assert "logit_scale" in skip and "text.token_embedding.weight" in skip
    assert "text.text_projection" not in skip and "visual.proj.weight" not in skip
    assert all(model.get_parameter(n).ndim < 2 for n in skip if "embedding" not in n and n != "logit_scale")


def test_trimming_unused_padding_leaves_text_embeddings_unchanged():
    from lightclip_core.data.tokenizer import trim_padding

    model = tiny_model()
    tokens = tokenize(["a red circle", "a large blue square at the top of the picture"], 16)
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    with torch.no_grad():
        assert torch.allclose(model.encode_text(trimmed), model.encode_text(tokens), atol=1e-6)
