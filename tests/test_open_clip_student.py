"""Any open_clip model as the student (`model.open_clip`, issue #19 item 2).

Two small open_clip architectures stand for the families open_clip ships: a ViT with OpenAI CLIP's causal text tower
in open_clip's top-level layout (ViT-B-32's), and a timm FastViT tower (MobileOne reparameterizable blocks, MCi's
family) with MobileCLIP's bidirectional text tower (MobileCLIP2-S0's). The reference is always open_clip itself: the
saved model loaded by `open_clip.create_model`, whose embeddings the student's must equal before its first update
and whose `forward` the student's token-level passes must reproduce. The built-in configs (MobileCLIP2-S0,
ViT-B-32) are read without weights, which cannot be downloaded here."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from helpers_start import student_at_step_0
from helpers_tiny import TINY, merge
from safetensors.torch import save_file

from lightclip_core.config import Config, ConfigError, validate
from lightclip_core.data.prepare import prepare
from lightclip_core.export.exporter import export, parity_inputs
from lightclip_core.export.load import load_exported
from lightclip_core.losses.objective import TrainingLoss, build_objectives
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import tokenize, trim_padding
from lightclip_core.stages.io import InputError
from lightclip_core.stages.start import start_weights
from lightclip_core.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
ARCHITECTURES = {
    # ViT-B-32's layout, shrunk: OpenAI CLIP's causal text tower with its modules at the top level
    "vit": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16,
                                            "head_width": 32},
            "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2}},
    # MobileCLIP2-S0's layout, shrunk: a timm FastViT tower (MobileOne blocks fold; its own head projects, timm_proj
    # null) and a bidirectional text tower
    "fastvit": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "fastvit_t8", "timm_model_pretrained": False,
                                                "timm_pool": "avg", "timm_proj": None, "image_size": 64},
                "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2, "no_causal_mask": True},
                "custom_text": True},
}
PARAMS = merge(TINY, {
    "data": {"synthetic": {"num_val": 8, "num_test": 8}},
    "model": {"embed_dim": None, "image": {"size": None}, "text": {"width": None, "heads": None, "layers": None}},
    "objectives": {"distill": {"enabled": False}, "token": {"image_stride": 16},
                   "mlm": {"fusion": [{"text_layer": 0, "image_stride": 16}, {"text_layer": 1, "image_stride": 16}]}},
    "train": {"threads": 1, "shuffle_buffer": 32, "max_steps": 3, "checkpoint_every": 3},
    "tracking": {"enabled": False},
    "export": {"onnx": False, "parity_batch": 2},
})


def write_architecture(directory: Path, kind: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": ARCHITECTURES[kind],
                                                                 "preprocess_cfg": PREPROCESS}))
    return directory


def save_open_clip_model(directory: Path, kind: str, seed: int) -> torch.nn.Module:
    """A randomly initialised open_clip model saved as open_clip's local-dir (config + open_clip_model.safetensors),
    in open_clip's own layout for that architecture; returned in eval mode, as open_clip loads it back."""
    write_architecture(directory, kind)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    for module in model.modules():  # BatchNorm statistics that are not the identity, so eval mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    return open_clip.create_model(f"local-dir:{directory}").eval()


def config(open_clip_spec: dict, **sections: dict) -> Config:
    return validate(merge(merge(PARAMS, sections), {"model": {"open_clip": open_clip_spec}}))


@torch.no_grad()
def embeddings(model: torch.nn.Module, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of fixed inputs (captions of different lengths, full padding)."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, cfg.model.image.size, cfg.model.image.size, generator=gen)
    tokens = tokenize(["a red circle", "a small blue square in the top left corner", "star"],
                      cfg.model.text.context_length)
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("open-clip-data")
    prepare(Config.model_validate(PARAMS).data, root)
    return root / "train"


# ------------------------------------------------------------------------------------------ starting from weights
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("how", ["local-dir", "architecture + checkpoint file"])
def test_the_student_starts_as_the_saved_open_clip_model(kind, how, data, tmp_path):
    saved = save_open_clip_model(tmp_path / "saved", kind, seed=7)
    if how == "local-dir":
        spec = {"model": f"local-dir:{tmp_path / 'saved'}"}
    else:  # the architecture from a config-only directory, the weights from open_clip's own checkpoint file
        spec = {"model": f"local-dir:{write_architecture(tmp_path / 'arch', kind)}",
                "pretrained": str(tmp_path / "saved" / "open_clip_model.safetensors")}
    cfg = config(spec)
    student = student_at_step_0(cfg, data, tmp_path / "run")["model"]
    student.visual.to(memory_format=torch.contiguous_format)  # the trainer's channels-last layout rounds differently
    for got, expected in zip(embeddings(student, cfg), embeddings(saved, cfg)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert float(student.scale()) == pytest.approx(float(saved.logit_scale.exp()))


def test_the_student_starts_from_open_clip_weights_on_s3(data, s3_env, tmp_path, monkeypatch):
    """`pretrained` as an s3:// URI: fetched into the cache, then loaded by open_clip's own loader."""
    import boto3

    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    saved = save_open_clip_model(tmp_path / "saved", "vit", seed=11)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="weights")
    s3.upload_file(str(tmp_path / "saved" / "open_clip_model.safetensors"), "weights", "vit/open_clip_model.safetensors")
    cfg = config({"model": f"local-dir:{write_architecture(tmp_path / 'arch', 'vit')}",
                  "pretrained": "s3://weights/vit/open_clip_model.safetensors"})
    student = student_at_step_0(cfg, data, tmp_path / "run")["model"]
    student.visual.to(memory_format=torch.contiguous_format)
    for got, expected in zip(embeddings(student, cfg), embeddings(saved, cfg)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_section_takes_the_architectures_fields_and_preprocessing(tmp_path):
    cfg = config({"model": f"local-dir:{write_architecture(tmp_path / 'a', 'fastvit')}"}).model
    assert (cfg.embed_dim, cfg.image.size, cfg.image.tower) == (32, 64, "open_clip")
    assert (cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.context_length) == (64, 2, 2, 16)
    assert cfg.text.causal is False and list(cfg.image.mean) == PREPROCESS["mean"]
    assert cfg.start_source() is None  # a config-only directory: a random start
    recorded = Config.model_validate(merge(PARAMS, {"model": cfg.architecture()})).model
    assert recorded.architecture() == cfg.architecture()  # a checkpoint's record rebuilds without the directory


@pytest.mark.parametrize("name, tag, expected", [
    ("MobileCLIP2-S0", "dfndr2b", {"embed_dim": 512, "size": 256, "mean": (0.0, 0.0, 0.0), "causal": False,
                                   "context_length": 77, "layers": 12, "interpolation": "bilinear"}),
    ("ViT-B-32", "openai", {"embed_dim": 512, "size": 224, "mean": (0.48145466, 0.4578275, 0.40821073),
                            "causal": True, "context_length": 77, "layers": 12, "interpolation": "bicubic"}),
])
def test_built_in_configs_fill_the_section_without_weights(name, tag, expected):
    cfg = config({"model": name, "pretrained": tag}).model
    got = {"embed_dim": cfg.embed_dim, "size": cfg.image.size, "mean": tuple(cfg.image.mean),
           "causal": cfg.text.causal, "context_length": cfg.text.context_length, "layers": cfg.text.layers,
           "interpolation": cfg.image.interpolation}
    assert got == expected
    assert cfg.start_source() == f"open_clip:{name} pretrained={tag}"


# ------------------------------------------------------------------------------------------ the towers' passes
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_token_and_map_passes_reproduce_open_clips_forward(kind, tmp_path):
    cfg = config({"model": f"local-dir:{write_architecture(tmp_path / 'a', kind)}"})
    torch.manual_seed(0)
    student = build_model(cfg.model).eval()
    images = torch.randn(2, 3, cfg.model.image.size, cfg.model.image.size)
    tokens = tokenize(["a red circle", "a small blue square in the top left corner"], cfg.model.text.context_length)
    with torch.no_grad():
        pooled, hidden = student.text.forward_tokens(tokens)
        torch.testing.assert_close(pooled, student.text(tokens), atol=0, rtol=0)
        student.text.output_tokens = True  # open_clip's own per-token output, the final hidden states
        _, reference = student.text(tokens)
        student.text.output_tokens = False
        torch.testing.assert_close(hidden, reference, atol=0, rtol=0)
        pooled_image, maps = student.visual.forward_maps(images, (16,))
        torch.testing.assert_close(pooled_image, student.visual(images), atol=1e-6, rtol=0)
        assert maps[16].shape[0] == 2 and maps[16].shape[-1] == cfg.model.image.size // 16
        assert maps[16].shape[1] == student.visual.stage_channels(16)


@pytest.mark.parametrize("kind, exact", [("vit", True), ("fastvit", False)])
def test_padding_is_trimmed_only_where_that_leaves_the_embedding_as_it_is(kind, exact, tmp_path):
    """A causal text tower never lets padding reach the pooled token; MobileCLIP's bidirectional tower attends to its
    padding, so its batches keep the full context (the trainer asks `ignores_padding`)."""
    cfg = config({"model": f"local-dir:{write_architecture(tmp_path / 'a', kind)}"})
    student = build_model(cfg.model).eval()
    tokens = tokenize(["a red circle", "two"], cfg.model.text.context_length)
    with torch.no_grad():
        full, trimmed = student.encode_text(tokens), student.encode_text(trim_padding(tokens))
    assert student.ignores_padding() is exact
    assert torch.allclose(full, trimmed, atol=1e-6) is exact


# ------------------------------------------------------------------------------------------ objectives, export
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_every_objective_trains_the_open_clip_student(kind, tmp_path):
    cfg = config({"model": f"local-dir:{write_architecture(tmp_path / 'a', kind)}"},
                 objectives={"contrastive": {"soft_targets": "uniform"}, "token": {"enabled": True},
                             "mlm": {"enabled": True}, "itm": {"enabled": True},
                             "distill": {"enabled": True}})
    torch.manual_seed(0)
    student = build_model(cfg.model)
    dims = [8, 12]
    objectives = build_objectives(cfg, student, {"dims": dims, "scales": [100.0, 50.0]})
    assert [o.name for o in objectives] == ["token", "mlm", "itm", "distill"]  # contrastive: distill's CLIP part
    n, size, length = 4, cfg.model.image.size, cfg.model.text.context_length
    captions = ["a red circle", "a blue square", "a green star", "a large yellow triangle"]
    extras = {"syn_tokens": tokenize(["red", "blue", "green", "yellow"], length),
              "teacher_image_emb": torch.nn.functional.normalize(torch.randn(n, sum(dims)), dim=-1),
              "teacher_text_emb": torch.nn.functional.normalize(torch.randn(n, sum(dims)), dim=-1),
              "teacher_syn_text_emb": torch.nn.functional.normalize(torch.randn(n, sum(dims)), dim=-1)}
    total, terms, _ = TrainingLoss(student, objectives)(torch.randn(n, 3, size, size), tokenize(captions, length),
                                                        0, 10, extras)
    total.backward()
    assert {"distill_clip_real", "soft_eps", "token_loss", "mlm_loss", "itm_loss", "distill_loss"} <= set(terms)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    towers = [p for name, p in student.named_parameters() if name.startswith(("visual.", "text."))]
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in towers) > 0.9 * len(towers)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """3 training steps of the FastViT student from saved open_clip weights, and its export."""
    root = tmp_path_factory.mktemp("open-clip-run")
    save_open_clip_model(root / "saved", "fastvit", seed=3)
    cfg = config({"model": f"local-dir:{root / 'saved'}"})
    # oneDNN's AVX2 JIT code segfaults in this student's backward on AVX2-only CPUs (README, known issue); the
    # property here is the export's folding, so train these 3 steps on PyTorch's own convolution kernels
    with torch.backends.mkldnn.flags(enabled=False):
        result = train(cfg, data, root / "run", start=start_weights(cfg))
    exported = export(cfg, result.final_checkpoint, root / "export")
    return {"cfg": cfg, "final": result.final_checkpoint, "export": root / "export", "result": exported}


def test_the_export_folds_the_towers_and_matches_the_trained_student(trained):
    from lightclip_core.train.checkpoint import load_checkpoint

    cfg, exported = trained["cfg"], trained["result"]
    assert exported.param_count < exported.param_count_unfused  # MobileOne branches folded into one convolution
    student = build_model(cfg.model)
    student.load_state_dict(load_checkpoint(trained["final"])["model"])
    loaded = load_exported(trained["export"])
    inputs = parity_inputs(student, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(inputs["image"]),
                                   student.eval().encode_image(inputs["image"]), atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded.model.encode_text(inputs["text"]),
                                   student.encode_text(inputs["text"]), atol=1e-5, rtol=0)


def test_the_export_is_an_open_clip_local_dir_and_starts_another_run(trained, data, tmp_path):
    """open_clip loads the export as it loads any local-dir, and the export starts a new run (fine-tuning on)."""
    from lightclip_core.train.checkpoint import load_checkpoint

    cfg = trained["cfg"]
    reference = open_clip.create_model(f"local-dir:{trained['export']}").eval()
    student = build_model(cfg.model)
    student.load_state_dict(load_checkpoint(trained["final"])["model"])
    for got, expected in zip(embeddings(reference, cfg), embeddings(student.eval(), cfg)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    again = config({"model": f"local-dir:{trained['export']}"})
    assert again.model.architecture() == cfg.model.architecture()
    restarted = student_at_step_0(again, data, tmp_path / "again")["model"]
    restarted.visual.to(memory_format=torch.contiguous_format)
    for got, expected in zip(embeddings(restarted, cfg), embeddings(student, cfg)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("model, message", [
    ({"text": {"width": 256}}, r"model\.text\.width=256: the open_clip student's is 64"),
    ({"embed_dim": 128}, r"model\.embed_dim=128"),
    ({"image": {"tower": "resnet18"}}, r"model\.image\.tower='resnet18'"),
    ({"preset": "mobileclip-s0"}, r"model\.preset and model\.open_clip"),
    ({"init_from": "artifacts/train"}, r"model\.init_from and model\.open_clip's pretrained"),
])
def test_fields_that_contradict_the_architecture_are_one_line_errors(model, message, tmp_path):
    saved = tmp_path / "saved"
    save_open_clip_model(saved, "vit", seed=0)
    with pytest.raises(ConfigError, match=message) as err:
        validate(merge(PARAMS, {"model": {**model, "open_clip": {"model": f"local-dir:{saved}"}}}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("edit, message", [
    ({"text_cfg": {"hf_tokenizer_name": "bert-base-uncased"}}, "Hugging Face"),
    ({"text_cfg": {"vocab_size": 32000}}, "32000 tokens"),
    ({"text_cfg": {"embed_cls": True}}, "class token"),
    ({"multimodal_cfg": {"width": 64}}, "CoCa"),
])
def test_text_towers_this_tokenizer_does_not_feed_are_refused(edit, message, tmp_path):
    arch = json.loads(json.dumps(ARCHITECTURES["vit"]))
    for key, value in edit.items():
        arch[key] = {**arch.get(key, {}), **value}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch}))
    with pytest.raises(ConfigError, match=message):
        config({"model": f"local-dir:{tmp_path}"})


def test_unknown_models_and_unreadable_weights_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown open_clip model 'NoSuchNet'"):
        config({"model": "NoSuchNet"})
    with pytest.raises(ConfigError, match=r"open_clip_config\.json does not exist"):
        config({"model": f"local-dir:{tmp_path / 'nowhere'}"})
    with pytest.raises(InputError, match="neither a checkpoint file nor a pretrained tag of ViT-B-32"):
        start_weights(config({"model": "ViT-B-32", "pretrained": "no-such-tag"}))
    write_architecture(tmp_path / "arch", "vit")
    (tmp_path / "garbage.safetensors").write_bytes(b"not weights")
    cfg = config({"model": f"local-dir:{tmp_path / 'arch'}", "pretrained": str(tmp_path / "garbage.safetensors")})
    with pytest.raises(InputError, match=r"model\.open_clip\.pretrained=.*garbage\.safetensors.*cannot load") as err:
        start_weights(cfg)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ a real architecture
@pytest.mark.slow
def test_mobileclip2_s0_trains_with_every_objective_and_exports_folded(tmp_path):
    """open_clip's own MobileCLIP2-S0 (fastvit_mci0 and a 12-layer bidirectional text tower, 75 M parameters, random
    weights: its tag cannot be downloaded here): one step of every objective, then the export folds MCi's MobileOne
    blocks, matches the student, and open_clip loads it back as a local-dir."""
    from lightclip_core.train.checkpoint import save_checkpoint

    cfg = config({"model": "MobileCLIP2-S0"}, objectives={"token": {"enabled": True, "image_stride": 32},
                                                          "mlm": {"enabled": True}, "itm": {"enabled": True},
                                                          "distill": {"enabled": True}},
                 export={"onnx": False, "parity_batch": 2})
    assert (cfg.model.embed_dim, cfg.model.image.size, cfg.model.text.layers, cfg.model.text.causal) == (512, 256, 12,
                                                                                                          False)
    torch.manual_seed(0)
    student = build_model(cfg.model)
    objectives = build_objectives(cfg, student, {"dims": [8], "scales": [100.0]})
    length = cfg.model.text.context_length
    extras = {"syn_tokens": tokenize(["red", "blue"], length),
              **{k: torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
                 for k in ("teacher_image_emb", "teacher_text_emb", "teacher_syn_text_emb")}}
    total, terms, _ = TrainingLoss(student, objectives)(torch.randn(2, 3, 256, 256),
                                                        tokenize(["a red circle", "a blue square"], length), 0, 10,
                                                        extras)
    total.backward()
    assert {"distill_clip_real", "token_loss", "mlm_loss", "itm_loss", "distill_loss"} <= set(terms)
    save_checkpoint(tmp_path / "final.pt", {"model": student.state_dict(), "model_config": cfg.model.architecture(),
                                            "step": 1})
    result = export(cfg, tmp_path / "final.pt", tmp_path / "export")
    assert result.param_count < result.param_count_unfused
    loaded = load_exported(tmp_path / "export").model
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'export'}").eval()
    inputs = parity_inputs(student, 2)
    with torch.no_grad():
        for model in (loaded, reference):
            torch.testing.assert_close(model.encode_image(inputs["image"], normalize=True),
                                       student.eval().encode_image(inputs["image"]), atol=1e-4, rtol=0)
            torch.testing.assert_close(model.encode_text(inputs["text"], normalize=True),
                                       student.encode_text(inputs["text"]), atol=1e-5, rtol=0)
