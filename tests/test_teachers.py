"""Teachers, captioner and the trained CoCa teacher of dataset reinforcement, with tiny open_clip models.

Checkpoints are given as local-dirs, as files for a registered architecture, and as s3:// URIs served by a real
moto S3 server. The captioner is checked against the model's full forward pass and against a CoCa whose weights
force the caption "a red square. it".
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lightclip_core.config import CocaTeacherConfig, Config, TeacherSpec
from lightclip_core.data.prepare import prepare
from lightclip_core.infra.storage import fetch_to_local, is_s3
from lightclip_core.reinforce import coca_teacher as ct
from lightclip_core.reinforce.captioner import Captioner, next_token_logits, top_p_filter
from lightclip_core.reinforce.teachers import TeacherEnsemble, TeacherLoadError, load_open_clip, resolve_spec

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
COCA_ARCH = "lightclip-test-coca-tiny"
CLIP_ARCH = "lightclip-test-clip-tiny"
TINY_CLIP = {"embed_dim": 24, "vision_cfg": {"image_size": 24, "patch_size": 8, "width": 32, "layers": 1,
                                              "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_coca(**overrides) -> CocaTeacherConfig:
    values = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                  text_width=32, text_layers=1, text_heads=2, decoder_layers=1, context_length=16, steps=30,
                  batch_size=16, lr=3e-3, warmup_steps=3, seed=0)
    return CocaTeacherConfig(**{**values, **overrides})


def make_coca_dir(final: Path, c: CocaTeacherConfig, seed: int = 0, mutate=None) -> Path:
    """An untrained CoCa published as an open_clip local-dir (optionally with edited weights)."""
    build = ct.fresh_build_dir(final)
    ct.write_config(build, ct.coca_model_config(c), ct.preprocess_config(c.image_size, MEAN, STD))
    torch.manual_seed(seed)
    model = ct.create_from_dir(build, torch.device("cpu"))
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    return ct.publish_model_dir(model, build, final)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(model, size: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = open_clip.tokenize(["a red square", "a blue circle on grey"], context_length)
    with torch.no_grad():
        return model.encode_image(images(2, size), normalize=True), model.encode_text(tokens, normalize=True)


def assert_same_outputs(a, b, size: int = 32, context_length: int = 16) -> None:
    for x, y in zip(outputs(a, size, context_length), outputs(b, size, context_length)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


class RecordingSink:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def train_dir(root) -> Path:
    cfg = Config.model_validate({"data": {"samples_per_shard": 64, "synthetic": {
        "num_train": 128, "num_val": 16, "num_test": 16, "image_size": 32}}})
    prepare(cfg.data, root / "data")
    return root / "data" / "train"


@pytest.fixture(scope="module")
def trained(root, train_dir):
    sink = RecordingSink()
    result = ct.train_coca_teacher(tiny_coca(), train_dir, root / "teacher", MEAN, STD, sink=sink, device="cpu")
    return result, sink


@pytest.fixture(scope="module")
def coca_dir(root) -> Path:
    return make_coca_dir(root / "coca-random" / "model", tiny_coca())


@pytest.fixture(scope="module")
def registered(root, coca_dir) -> dict[str, Path]:
    """Register the tiny architectures with open_clip; checkpoint files for both."""
    configs = root / "arch"
    configs.mkdir()
    (configs / f"{COCA_ARCH}.json").write_text(json.dumps(ct.coca_model_config(tiny_coca())))
    (configs / f"{CLIP_ARCH}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(configs)
    torch.manual_seed(1)
    clip = open_clip.create_model(CLIP_ARCH)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip.safetensors"))
    return {"coca": coca_dir / ct.WEIGHTS_FILE, "clip": root / "clip.safetensors"}


@pytest.fixture
def s3(s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="teachers")
    yield client
    for obj in client.list_objects_v2(Bucket="teachers").get("Contents", []):
        client.delete_object(Bucket="teachers", Key=obj["Key"])
    client.delete_bucket(Bucket="teachers")


# ---------------------------------------------------------------------------------------- trained teacher
def test_trained_teacher_is_an_open_clip_local_dir(trained):
    result, _ = trained
    assert sorted(p.name for p in result.model_dir.iterdir()) == [ct.CONFIG_FILE, ct.WEIGHTS_FILE]
    assert not [p for p in result.model_dir.parent.iterdir() if p.name.startswith(".")]  # no build leftovers
    config = json.loads((result.model_dir / ct.CONFIG_FILE).read_text())
    assert config["preprocess_cfg"] == {"size": 32, "mean": list(MEAN), "std": list(STD),
                                        "interpolation": "bicubic", "resize_mode": "shortest"}
    reloaded = open_clip.create_model(f"local-dir:{result.model_dir}").eval()
    assert isinstance(reloaded, open_clip.CoCa)
    assert_same_outputs(result.model, reloaded)
    model, size, mean, std = load_open_clip(TeacherSpec(model=f"local-dir:{result.model_dir}"), "unused", "cpu")
    assert (size, mean, std) == (32, MEAN, STD) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert_same_outputs(result.model, model)


def test_trained_teacher_log_and_loss_decrease(trained):
    result, sink = trained
    with open(result.log_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ct.LOG_COLUMNS) and len(rows) == 30
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[:5]) > np.mean(losses[-5:])
    assert [step for _, step in sink.calls] == list(range(1, 31))
    assert set(sink.calls[0][0]) == set(ct.LOG_COLUMNS) - {"step"}
    assert result.metrics["steps"] == 30 and result.metrics["samples_per_s"] > 0


def test_nan_loss_names_the_step_and_publishes_nothing(root, train_dir, monkeypatch):
    class NanLoss(torch.nn.Module):
        def __init__(self, **_):
            super().__init__()

        def forward(self, image_features, *rest):
            nan = image_features.sum() * float("nan")
            return nan, nan

    monkeypatch.setattr(ct, "CoCaLoss", NanLoss)
    with pytest.raises(RuntimeError, match="at step 1"):
        ct.train_coca_teacher(tiny_coca(steps=2), train_dir, root / "nan", MEAN, STD, device="cpu")
    assert not (root / "nan" / "model").exists()
    assert not [p for p in (root / "nan").iterdir() if p.name.startswith(".")]


def test_coca_config_shape():
    cfg = ct.coca_model_config(tiny_coca())
    assert cfg["vision_cfg"]["attentional_pool"] and cfg["vision_cfg"]["output_tokens"]
    assert cfg["text_cfg"]["embed_cls"] and cfg["text_cfg"]["output_tokens"]
    assert cfg["text_cfg"]["vocab_size"] == cfg["multimodal_cfg"]["vocab_size"] == 49408
    with pytest.raises(ValueError, match="text_width=64 must equal"):
        ct.coca_model_config(tiny_coca(text_width=64))


# ---------------------------------------------------------------------------------- checkpoints, s3://
def test_checkpoint_file_for_a_registered_architecture(registered, coca_dir, root):
    reference = open_clip.create_model(f"local-dir:{coca_dir}").eval()
    from_file, *_ = load_open_clip(TeacherSpec(model=COCA_ARCH, pretrained=str(registered["coca"])), root, "cpu")
    assert_same_outputs(reference, from_file)
    # local-dir + pretrained: the architecture from the directory, the weights from the file
    other = make_coca_dir(root / "coca-other" / "model", tiny_coca(), seed=5)
    spec = TeacherSpec(model=f"local-dir:{coca_dir}", pretrained=str(other / ct.WEIGHTS_FILE))
    overridden, *_ = load_open_clip(spec, root, "cpu")
    assert_same_outputs(open_clip.create_model(f"local-dir:{other}").eval(), overridden)


def test_s3_checkpoint_and_local_dir_prefix(s3, registered, coca_dir, root):
    s3.upload_file(str(registered["coca"]), "teachers", "ckpt/coca.safetensors")
    for f in coca_dir.iterdir():
        s3.upload_file(str(f), "teachers", f"coca/{f.name}")
    cache = root / "cache"
    reference = open_clip.create_model(f"local-dir:{coca_dir}").eval()
    for spec in (TeacherSpec(model=COCA_ARCH, pretrained="s3://teachers/ckpt/coca.safetensors"),
                 TeacherSpec(model="local-dir:s3://teachers/coca")):
        name, pretrained = resolve_spec(spec, cache)
        assert not is_s3(name) and not (pretrained and is_s3(pretrained))
        model, *_ = load_open_clip(spec, cache, "cpu")
        assert_same_outputs(reference, model)

    cached = fetch_to_local("s3://teachers/ckpt/coca.safetensors", cache)
    before = os.stat(cached)
    again = fetch_to_local("s3://teachers/ckpt/coca.safetensors", cache)
    after = os.stat(again)
    assert again == cached and (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    s3.put_object(Bucket="teachers", Key="ckpt/coca.safetensors", Body=b"changed")
    assert fetch_to_local("s3://teachers/ckpt/coca.safetensors", cache).read_bytes() == b"changed"


def test_fetch_errors(s3, root):
    with pytest.raises(FileNotFoundError, match="no/such/file"):
        fetch_to_local(str(root / "no/such/file"), root / "cache")
    with pytest.raises(FileNotFoundError, match="s3://teachers/missing.pt"):
        fetch_to_local("s3://teachers/missing.pt", root / "cache")
    with pytest.raises(FileNotFoundError, match="no objects"):
        fetch_to_local("s3://teachers/empty/", root / "cache")


# -------------------------------------------------------------------------------------------- ensemble
def test_ensemble_concatenates_normalised_embeddings(registered, coca_dir, root):
    specs = [TeacherSpec(model=f"local-dir:{coca_dir}"),
             TeacherSpec(model=CLIP_ARCH, pretrained=str(registered["clip"]), logit_scale=50.0)]
    ensemble = TeacherEnsemble(specs, root / "cache", "cpu")
    coca, clip = (t.model for t in ensemble.teachers)
    assert ensemble.dims == [32, 24] and ensemble.image_sizes == [32, 24]
    assert ensemble.scales == [pytest.approx(float(coca.logit_scale.exp())), 50.0]
    described = ensemble.describe()
    assert [d["dim"] for d in described] == [32, 24] and described[0]["mean"] == list(MEAN)
    assert set(described[1]) == {"model", "pretrained", "dim", "logit_scale", "image_size", "mean", "std",
                                 "weights_sha256"}

    pictures = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8))
                for i in range(3)]
    batches = [torch.stack([ensemble.preprocess(p, t) for p in pictures]) for t in range(2)]
    assert batches[0].shape == (3, 3, 32, 32) and batches[1].shape == (3, 3, 24, 24)
    got = ensemble.encode_images(batches)
    want = torch.cat([coca.encode_image(batches[0], normalize=True), clip.encode_image(batches[1], normalize=True)], 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    texts = ["a red square", "a small blue circle"]
    got = ensemble.encode_texts(texts)
    want = torch.cat([coca.encode_text(open_clip.tokenize(texts, 16), normalize=True),
                      clip.encode_text(open_clip.tokenize(texts, 16), normalize=True)], 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    sized = pictures[0].resize((24, 24))
    torch.testing.assert_close(ensemble.to_tensor(sized, 1), ensemble.preprocess(sized, 1))


# ------------------------------------------------------------------------------------------- captioner
def brute_force_nucleus(row: np.ndarray, p: float) -> set[int]:
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    k = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
    return set(order[:min(k, len(order))].tolist())


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_filter_matches_brute_force(top_p):
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    kept = torch.isfinite(top_p_filter(logits, top_p))
    for row, mask in zip(logits.numpy(), kept):
        assert set(mask.nonzero().flatten().tolist()) == brute_force_nucleus(row, top_p)
    filtered = top_p_filter(logits, top_p)
    torch.testing.assert_close(filtered[kept], logits[kept])


def test_top_p_filter_extremes():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    kept = torch.isfinite(top_p_filter(logits, 1e-9))
    assert kept.sum(1).tolist() == [1] * 8 and kept.float().argmax(1).tolist() == logits.argmax(1).tolist()


def test_captioner_is_deterministic_and_clean(coca_dir, root):
    captioner = Captioner(TeacherSpec(model=f"local-dir:{coca_dir}"), root / "cache", "cpu")
    batch = images(3, 32)
    first = captioner.generate(batch, 2, 0.9, 1.0, 12, torch.Generator().manual_seed(7))
    second = captioner.generate(batch, 2, 0.9, 1.0, 12, torch.Generator().manual_seed(7))
    other = captioner.generate(batch, 2, 0.9, 1.0, 12, torch.Generator().manual_seed(8))
    assert first == second and first != other
    assert [len(c) for c in first] == [2, 2, 2]
    for text in (t for caps in first + other for t in caps):
        assert "." not in text and "<start_of_text>" not in text and "<end_of_text>" not in text
        assert text == text.strip()


def test_captioner_logits_equal_the_full_forward_pass(coca_dir, root):
    captioner = Captioner(TeacherSpec(model=f"local-dir:{coca_dir}"), root / "cache", "cpu")
    model, batch = captioner.model, images(2, 32, seed=1)
    tokens = open_clip.tokenize(["a red square on a grey background", "two blue circles"], 16)
    with torch.no_grad():
        latent, embs = model._encode_image(batch)
        for length in (1, 3, 6):
            loop = next_token_logits(model, tokens[:, :length], latent, embs)
            full = model(batch, tokens[:, :length + 1])["logits"][:, -1]  # teacher forcing drops the last token
            torch.testing.assert_close(loop, full, atol=1e-5, rtol=1e-5)


def _force_caption(chain: list[int]):
    """Weights under which every step predicts the next token of `chain` from the current token alone: residual
    blocks of the text tower and decoder are identities, the decoder's projection maps token k to its successor."""
    def mutate(model):
        for module in (model.text, model.text_decoder):
            for name, p in module.named_parameters():
                if "out_proj" in name or "c_proj" in name:
                    p.zero_()
        model.text.positional_embedding.zero_()
        projection = model.text_decoder.text_projection
        projection.zero_()
        for k, (token, successor) in enumerate(zip(chain[:-1], chain[1:])):
            model.text.token_embedding.weight[token] = torch.nn.functional.one_hot(
                torch.tensor(k), projection.shape[0]).float()
            projection[k, successor] = 10.0
    return mutate


def test_captioner_cuts_a_forced_caption_at_the_period(root):
    tok = open_clip.SimpleTokenizer()
    chain = [tok.sot_token_id, *tok.encode("a red square. it"), tok.eot_token_id]
    model_dir = make_coca_dir(root / "coca-forced" / "model", tiny_coca(), mutate=_force_caption(chain))
    captioner = Captioner(TeacherSpec(model=f"local-dir:{model_dir}"), root / "cache", "cpu")
    captions = captioner.generate(images(2, 32), 3, 0.9, 1.0, 12, torch.Generator().manual_seed(0))
    assert captions == [["a red square"] * 3] * 2
    assert captioner.generate(images(1, 32), 1, 0.9, 1.0, 2, torch.Generator()) == [["a red"]]


# ---------------------------------------------------------------------------------------------- errors
def _corrupt(root: Path, suffix: str) -> str:
    path = root / f"corrupt{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return str(path)


@pytest.mark.parametrize("case", ["corrupt-safetensors", "corrupt-pt", "missing-dir", "unknown-name",
                                  "missing-file"])
def test_load_errors_name_the_spec(case, registered, root):
    spec = {
        "corrupt-safetensors": lambda: TeacherSpec(model=COCA_ARCH, pretrained=_corrupt(root, ".safetensors")),
        "corrupt-pt": lambda: TeacherSpec(model=COCA_ARCH, pretrained=_corrupt(root, ".pt")),
        "missing-dir": lambda: TeacherSpec(model=f"local-dir:{root / 'no-such-dir'}"),
        "unknown-name": lambda: TeacherSpec(model="no-such-model-xyz", pretrained="/tmp/x.pt"),
        "missing-file": lambda: TeacherSpec(model=COCA_ARCH, pretrained=str(root / "absent.safetensors")),
    }[case]()
    with pytest.raises(TeacherLoadError) as info:
        load_open_clip(spec, root / "cache", "cpu")
    message = str(info.value)
    assert "\n" not in message and repr(spec.model) in message and repr(spec.pretrained) in message


def test_captioner_refuses_a_model_without_a_decoder(registered, root):
    spec = TeacherSpec(model=CLIP_ARCH, pretrained=str(registered["clip"]))
    with pytest.raises(TeacherLoadError, match=f"{CLIP_ARCH}.*not an open_clip CoCa") as info:
        Captioner(spec, root / "cache", "cpu")
    assert "\n" not in str(info.value)


def test_a_fresh_coca_teacher_has_no_uninitialised_parameters(tmp_path):
    """open_clip leaves CoCa's decoder projection as `torch.empty`; deterministic mode fills such memory with NaN, so
    a NaN here means a parameter was never initialised."""
    from lightclip_core.reinforce.coca_teacher import (coca_model_config, create_from_dir, preprocess_config,
                                                       write_config)

    c = tiny_coca()
    write_config(tmp_path, coca_model_config(c), preprocess_config(c.image_size, [0.5] * 3, [0.5] * 3))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = create_from_dir(tmp_path, torch.device("cpu"))
    finally:
        torch.use_deterministic_algorithms(previous)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert bad == []
    projection = model.text_decoder.text_projection
    assert abs(float(projection.detach().std()) - c.text_width ** -0.5) < 0.1 * c.text_width ** -0.5


def test_sampling_follows_the_renormalised_nucleus():
    """200k draws against the exact nucleus distribution (chi-square), for two temperatures."""
    from scipy.stats import chisquare

    from lightclip_core.reinforce.captioner import sample_next

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1.0, 0.7), (2.0, 0.95)):
        probs = torch.softmax(logits[0] / temperature, dim=0).double()
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        nucleus = order[before < top_p]
        expected = torch.zeros_like(probs)
        expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
        draws = sample_next(logits.repeat(200_000, 1), top_p, temperature, generator)
        counts = torch.bincount(draws, minlength=5).double()
        assert counts[expected == 0].sum() == 0
        kept = expected > 0
        assert chisquare(counts[kept].numpy(), (expected[kept] * 200_000).numpy()).pvalue > 1e-4


def test_a_teachers_description_changes_with_its_weights_and_only_with_them():
    """The reinforcement fingerprint holds each teacher's weights digest: a retrained teacher at the same path (same
    spec, perhaps the same clamped logit scale) must not reuse shards reinforced with the old one."""
    from lightclip_core.reinforce.teachers import weights_digest

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_buffer("scale", torch.tensor(4.6))  # 0-d tensors count too
    same = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    same.register_buffer("scale", torch.tensor(4.6))
    same.load_state_dict(model.state_dict())
    assert weights_digest(model) == weights_digest(same)
    with torch.no_grad():
        same[0].weight[0, 0] += 1e-6
    assert weights_digest(model) != weights_digest(same)
    same.load_state_dict(model.state_dict())
    same.scale.fill_(4.7)
    assert weights_digest(model) != weights_digest(same)


@pytest.mark.parametrize("captions", [["a"], ["a red square on the left of the image", "a", "a blue circle"]])
def test_trimmed_text_encoding_equals_open_clips_on_the_padded_tokens(captions):
    """encode_text runs only up to the batch's last end-of-text column; for open_clip's causal, end-of-text-pooled
    CLIP that is exact: the reference is open_clip's own encode_text over all 16 columns."""
    from lightclip_core.reinforce.teachers import encode_text

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    tokens = open_clip.tokenize(captions, context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens, normalize=True),
                                   model.encode_text(tokens, normalize=True), atol=1e-6, rtol=1e-5)


def test_reduced_vocabulary_sampling_keeps_the_full_vocabularys_nucleus():
    """The captioning decoder samples over its own few tokens, not the tokenizer's 49408: the nucleus and its
    probabilities, mapped back to tokenizer ids, are those of the full-vocabulary logits (-inf elsewhere)."""
    from lightclip_core.models.tokenizer import special_token_ids
    from lightclip_core.reinforce.caption_decoder import CaptionDecoder, TowerCaptioner

    special = special_token_ids()
    vocab = [-1, special["sot"], special["eot"], *range(300, 340)]
    torch.manual_seed(0)
    model = TowerCaptioner("resnet18", CaptionDecoder(vocab, 512, width=32, heads=2, layers=1,
                                                      context_length=8)).eval()
    prefix = open_clip.tokenize(["a red square", "a"], 8)[:, :3]
    with torch.no_grad():
        memory = model.encode(torch.randn(2, 3, 32, 32))
        full = model.next_logits(prefix, memory)
        reduced = model.next_reduced_logits(prefix, memory)
    for top_p in (0.3, 0.9):
        full_p = torch.softmax(top_p_filter(full, top_p), dim=-1)
        reduced_p = torch.softmax(top_p_filter(reduced, top_p), dim=-1)
        mapped = torch.zeros_like(full_p).index_add_(1, model.decoder.to_token, reduced_p)
        torch.testing.assert_close(mapped, full_p)
