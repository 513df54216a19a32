"""The CLIP wrapper: timm image tower with token map, shortened text tower, clamped temperature."""
from __future__ import annotations

import pytest
import torch

from lightclip_core.config import ModelConfig
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import tokenize

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
    from lightclip_core.models.tokenizer import trim_padding

    model = tiny_model()
    tokens = tokenize(["a red circle", "a large blue square at the top of the picture"], 16)
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    with torch.no_grad():
        assert torch.allclose(model.encode_text(trimmed), model.encode_text(tokens), atol=1e-6)


def text_variant(kind: str, causal: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"text": TINY.text.model_copy(update={"kind": kind, "causal": causal})})
    return build_model(cfg).eval()


TEXT_VARIANTS = [("transformer", False), ("mct", False), ("mct", True)]


@pytest.mark.parametrize("kind,causal", TEXT_VARIANTS, ids=[f"{k}-{'causal' if c else 'bidirectional'}"
                                                            for k, c in TEXT_VARIANTS])
def test_padding_never_reaches_bidirectional_or_convolutional_text_towers(kind: str, causal: bool):
    """Neither attention nor the token-mixing convolutions see past end-of-text: the padding's content and the
    padded length leave the embedding unchanged (so trimming padding in training is exact for every tower)."""
    from lightclip_core.models.tokenizer import trim_padding

    model = text_variant(kind, causal)
    tokens = tokenize(["a small red circle", "a large blue square at the top of the picture"], 16)
    noisy = tokens.clone()
    noisy[tokens == 0] = 320
    with torch.no_grad():
        reference = model.encode_text(tokens)
        assert torch.allclose(model.encode_text(noisy), reference, atol=1e-6)
        assert torch.allclose(model.encode_text(trim_padding(tokens)), reference, atol=1e-6)


def test_bidirectional_attention_lets_early_tokens_see_later_ones():
    model = text_variant("transformer", causal=False)
    a, b = tokenize(["a red circle", "a red square"], 16)
    with torch.no_grad():
        _, states_a = model.text.forward_tokens(a[None])
        _, states_b = model.text.forward_tokens(b[None])
    assert not torch.allclose(states_a[0, 1], states_b[0, 1])  # "a" differs once it sees "circle" vs "square"


def test_mct_wraps_the_transformer_in_two_repmixer_blocks_and_initialises_its_projection():
    from lightclip_core.models.repmixer import RepMixerBlock

    text = text_variant("mct", causal=False).text
    assert isinstance(text.mixer_in, RepMixerBlock) and isinstance(text.mixer_out, RepMixerBlock)
    assert len(text.transformer.resblocks) == TINY.text.layers
    assert text.mixer_in.token_mixer.kernel_size == (1, TINY.text.mixer_kernel)
    std = text.text_projection.std().item()  # CLIP's width ** -0.5, never left uninitialised
    assert abs(std - TINY.text.width ** -0.5) < 0.2 * TINY.text.width ** -0.5


def test_output_stride_dilates_the_last_stages_and_the_registered_variant_is_the_same_network():
    """model.image.output_stride=16: a 64 px image ends in a 4 x 4 map (2 x 2 at the tower's own stride 32) with
    the same parameters; `<tower>_os16` (what open_clip's timm tower is built from) is that network."""
    import timm

    from lightclip_core.models.image_tower import ImageTower
    from lightclip_core.models.timm_variants import dilated_name, ensure_registered

    own, dilated = ImageTower("mobilenetv2_050", 16), ImageTower("mobilenetv2_050", 16, output_stride=16)
    x = torch.randn(2, 3, 64, 64)
    assert own.feature_map(x).shape[1] == 4 and dilated.feature_map(x).shape[1] == 16
    assert [p.shape for p in own.parameters()] == [p.shape for p in dilated.parameters()]
    name = dilated_name("mobilenetv2_050", 16)
    assert name == "mobilenetv2_050_os16" and dilated_name("mobilenetv2_050", None) == "mobilenetv2_050"
    variant = timm.create_model(name, num_classes=0, global_pool="")
    variant.load_state_dict(dilated.trunk.state_dict())
    with torch.no_grad():
        dilated.eval(), variant.eval()
        torch.testing.assert_close(variant.forward_features(x), dilated.trunk.forward_features(x))
    assert not ensure_registered("mobilenetv2_050_os4") and not ensure_registered("no_such_tower_os16")
