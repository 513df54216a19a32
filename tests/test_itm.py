"""Image-text matching with hard negatives (ALBEF), checked against independent references: the negative sampling
distribution (brute-force probabilities, chi-square test), a tiny model that learns to match coloured images with
their captions, an export that does not depend on ITM, the fusion blocks shared with MLM (one set of parameters,
gradients that add up), the loss of a step recomputed by hand from the fused pass, and the config rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.stats import chisquare

from lightclip_core.config import Config, ConfigError, validate
from lightclip_core.export.exporter import export
from lightclip_core.losses import StepContext
from lightclip_core.losses.fusion import FusionBlocks
from lightclip_core.losses.itm import ImageTextMatchingObjective, _generator, draw_negatives, negative_weights
from lightclip_core.losses.mlm import MaskedLanguageObjective
from lightclip_core.losses.objective import TrainingLoss, build_objectives, forward_needs
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import special_token_ids, tokenize, trim_padding
from lightclip_core.train.checkpoint import save_checkpoint
from lightclip_core.train.trainer import CHECKPOINT_FORMAT, build_optimizer

MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
         "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 3}}
# mobilenetv2_050 at 32 px: stride 8 -> 16 channels (4x4), stride 16 -> 48 (2x2), stride 32 -> 160 (1x1)
FUSION = [(0, 8), (1, 16), (2, 32)]
OFF = {"enabled": False}
MLM = {"enabled": True, "mask_prob": 0.4, "batch_fraction": 1.0, "weight": 1.5,
       "fusion": [{"text_layer": layer, "image_stride": stride} for layer, stride in FUSION]}
ITM = {"enabled": True, "negatives": "hard", "weight": 0.7}
# a repeated caption (indices 0 and 5): a pair with an identical caption matches, so it is never a negative
CAPTIONS = [
    "a photo of a red circle on a blue background", "two green triangles next to a small yellow star",
    "a purple square", "an orange ellipse at the bottom left of the picture with some noise around it",
    "cat and dog", "a photo of a red circle on a blue background", "three blue dots",
    "a tiny black star above a pink rectangle on the right",
]
EOT = special_token_ids()["eot"]

pytestmark = pytest.mark.usefixtures("one_thread")


def config(model: dict = MODEL, **objectives: dict) -> Config:
    """Contrastive, token and distillation off, MLM (fusion as FUSION) and ITM on, unless replaced."""
    sections = {"contrastive": OFF, "token": OFF, "distill": OFF, "mlm": MLM, "itm": ITM}
    sections.update(objectives)
    return Config.model_validate({"model": model, "objectives": sections})


def _objective(objectives, kind):
    [found] = [o for o in objectives if isinstance(o, kind)]
    return found


def _randomise(fusion: FusionBlocks, seed: int = 123) -> None:
    """Non-zero output projections: the fused pass then differs from the plain text pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in fusion:
            w, b = block.attn.out_proj.weight, block.attn.out_proj.bias
            w.copy_(0.3 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
            b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=b.dtype))


def _batch(captions=CAPTIONS, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(len(captions), 3, 32, 32, generator=gen, dtype=dtype)
    return images, trim_padding(tokenize(captions, MODEL["text"]["context_length"]))


# ------------------------------------------------------------------------------------ 1. sampling distribution
def _brute_force(logits: torch.Tensor, same: torch.Tensor, kind: str) -> list[list[float] | None]:
    """Row i: softmax over the whole row ("hard") or 1 ("random"), zero where the caption is identical (the
    diagonal included), renormalised; None where nothing is left."""
    b = logits.shape[0]
    out: list[list[float] | None] = []
    for i in range(b):
        exps = [math.exp(float(logits[i, j])) for j in range(b)]
        z = sum(exps)
        w = [0.0 if same[i, j] else (exps[j] / z if kind == "hard" else 1.0) for j in range(b)]
        total = sum(w)
        out.append([x / total for x in w] if total > 0 else None)
    return out


GROUPS = [0, 1, 0, 2, 3, 3, 4, 0]  # caption classes: rows 0, 2, 7 share one caption, rows 4, 5 another


def _fixed_logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(GROUPS), len(GROUPS), generator=gen)
    groups = torch.tensor(GROUPS)
    return logits, groups[:, None] == groups[None, :]


@pytest.mark.parametrize("kind", ["hard", "random"])
def test_negatives_follow_the_brute_force_distribution(kind):
    """Empirical frequencies of `draw_negatives(negative_weights(...))` per row against the brute-force
    probabilities (chi-square, fixed seed); identical captions and the positive are never drawn."""
    logits, same = _fixed_logits()
    b, draws = len(GROUPS), 6000
    reference = _brute_force(logits, same, kind)
    weights = negative_weights(logits, same, kind)
    for i, p in enumerate(reference):  # the weights themselves, normalised, are the reference
        torch.testing.assert_close(weights[i] / weights[i].sum(), torch.tensor(p), rtol=1e-5, atol=1e-7)

    rows, cols = draw_negatives(weights.repeat(draws, 1), torch.Generator().manual_seed(11))
    assert rows.tolist() == list(range(draws * b))  # every row has a candidate
    cols = cols.view(draws, b)
    for i, p in enumerate(reference):
        counts = torch.bincount(cols[:, i], minlength=b)
        allowed = [j for j in range(b) if p[j] > 0]
        forbidden = [j for j in range(b) if p[j] == 0]
        assert i in forbidden and all(GROUPS[j] == GROUPS[i] for j in forbidden)
        assert int(counts[forbidden].sum()) == 0
        expected = [draws * p[j] for j in allowed]
        assert min(expected) > 20
        result = chisquare([int(counts[j]) for j in allowed], expected)
        assert result.pvalue > 1e-3, (kind, i, counts.tolist(), expected)
    if kind == "hard":  # the hard distribution is not the uniform one (the test can tell them apart)
        uniform = _brute_force(logits, same, "random")
        assert max(abs(a - c) for p, u in zip(reference, uniform) for a, c in zip(p, u)) > 0.1


@pytest.mark.parametrize("kind", ["hard", "random"])
def test_rows_without_a_candidate_get_no_negative(kind):
    logits, _ = _fixed_logits()
    b = logits.shape[0]
    # a batch whose captions are all identical: no row has a negative
    rows, cols = draw_negatives(negative_weights(logits, torch.ones(b, b, dtype=torch.bool), kind),
                                torch.Generator().manual_seed(0))
    assert rows.numel() == 0 and cols.numel() == 0
    # a mask in which row 2 excludes every column: row 2 is left out, the other rows keep their draws
    same = torch.eye(b, dtype=torch.bool)
    same[2] = True
    rows, cols = draw_negatives(negative_weights(logits, same, kind).repeat(200, 1),
                                torch.Generator().manual_seed(0))
    assert not (rows % b == 2).any()
    assert rows.numel() == 200 * (b - 1)
    assert not (cols == rows % b).any()


# ------------------------------------------------------------------------------------ 2. ITM learns to match
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
           "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0)}
ITM_THRESHOLD = 0.35  # well below ln 2 = 0.693, and below 0.637, the loss of guessing the share of matches (1/3)
ITM_STEPS = 120


def _train_itm(negatives: str, steps: int = ITM_STEPS) -> tuple[list[float], list[float]]:
    """Only ITM on: a two-layer text tower fused with the stride-8 map after layers 0 and 1, eight solid colour
    images and captions naming the colour, full-batch AdamW (lr 2e-3, 10 warmup steps, cosine decay).

    The fusion blocks' output projections start as BERT/ALBEF start them (`objectives.mlm.fusion_init_std: 0.02`):
    from the exact-identity init the escape from the chance plateau (0.637) takes anywhere from 50 to over 200 steps
    depending on the seed. Returns the training losses and the losses of eight later steps (fresh negatives) without
    updates."""
    model_cfg = {**MODEL, "text": {**MODEL["text"], "layers": 2}}
    fusion = [{"text_layer": 0, "image_stride": 8}, {"text_layer": 1, "image_stride": 8}]
    cfg = config(model_cfg, mlm={"enabled": False, "fusion": fusion, "fusion_init_std": 0.02},
                 itm={"enabled": True, "negatives": negatives})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    module = TrainingLoss(model, build_objectives(cfg, model)).train()
    [itm] = module.objectives
    assert itm.name == "itm" and itm.negatives == negatives
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float)
    images = ((rgb - 0.5) / 0.25)[:, :, None, None].expand(-1, -1, 32, 32).contiguous()
    tokens = trim_padding(tokenize([f"a {c} picture" for c in COLOURS], MODEL["text"]["context_length"]))
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    losses = []
    for step in range(steps):
        total, terms, _ = module(images, tokens, step, steps)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        losses.append(terms["itm_loss"])
    with torch.no_grad():
        later = [module(images, tokens, 10_000 + k, steps)[1]["itm_loss"] for k in range(8)]
    return losses, later


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_itm_learns_to_match_colours_with_their_captions(negatives):
    """The ITM loss of the trained model (eight steps of fresh negatives, no updates) falls well below ln 2."""
    losses, later = _train_itm(negatives)
    running = [sum(losses[k - 9:k + 1]) / 10 for k in range(9, len(losses))]
    below = next((k + 10 for k, v in enumerate(running) if v < ITM_THRESHOLD), None)  # steps to get below
    assert losses[0] > 0.55  # it starts near chance
    assert below is not None and sum(later) / len(later) < ITM_THRESHOLD, (below, losses[::10], later)
    assert max(later) < 0.5, later


# ------------------------------------------------------------------------------------ 3. export unchanged by ITM
def test_export_does_not_depend_on_itm(tmp_path: Path):
    """Two step checkpoints that differ only in their objectives (ITM on / off, same model weights, the model trained
    one step with ITM on) export identical parameters, name for name and value for value; no export name belongs to
    the fusion blocks or the ITM head."""
    contrastive = {"enabled": True, "soft_targets": "none"}
    on = config(contrastive=contrastive)
    off = config(contrastive=contrastive, itm=OFF)
    on = on.model_copy(update={"export": on.export.model_copy(update={"onnx": False, "parity_batch": 2})})
    torch.manual_seed(0)
    model = build_model(on.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    objectives_on = build_objectives(on, model)
    assert [o.name for o in objectives_on] == ["contrastive", "mlm", "itm"]
    _randomise(_objective(objectives_on, ImageTextMatchingObjective).fusion)
    module = TrainingLoss(model, objectives_on).train()
    optimizer = build_optimizer(model, on, objectives_on)
    images, tokens = _batch(dtype=torch.float32)
    total, terms, _ = module(images, tokens, 0, 2)
    assert terms["itm_loss"] > 0
    total.backward()
    optimizer.step()
    model.eval()
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    objectives_off = build_objectives(off, model)
    assert [o.name for o in objectives_off] == ["contrastive", "mlm"]

    state_on, state_off = objectives_on.state_dict(), objectives_off.state_dict()
    assert any(k.startswith("2.head.") for k in state_on) and not any(k.startswith("2.") for k in state_off)

    def checkpoint(name: str, objectives_state: dict) -> Path:
        return save_checkpoint(tmp_path / name / "step-00000001.pt", {
            "format": CHECKPOINT_FORMAT, "step": 1, "model": model.state_dict(), "objectives": objectives_state,
            "model_config": on.model.model_dump(mode="json")})

    exported = {name: export(on, checkpoint(name, state), tmp_path / f"export-{name}")
                for name, state in (("on", state_on), ("off", state_off))}
    weights = {name: load_file(result.files["weights"]) for name, result in exported.items()}
    assert list(weights["on"]) == list(weights["off"]) and weights["on"]
    for k, v in weights["on"].items():
        assert torch.equal(v, weights["off"][k]), k
    trained = model.state_dict()
    # mobilenetv2 has nothing to fold and both towers are read: the export is the checkpoint's plain model
    assert set(weights["on"]) == set(build_model(on.model).state_dict())
    for name, value in weights["on"].items():
        assert torch.equal(value, trained[name]), name
        # no name of the objectives' modules; "head" only inside the image trunk's own `conv_head`, a layer of
        # the plain model (exported with or without ITM), never the ITM head (`head.weight` of the objective)
        parts = name.split(".")
        assert "fusion" not in name and "itm" not in name and "head" not in parts, name
        assert not name.startswith(("objectives", "head")), name
    configs = [json.loads(r.files["config"].read_text()) for r in exported.values()]
    assert configs[0] == configs[1]


# ------------------------------------------------------------------------------------ 4. fusion shared with MLM
def _shared_setup():
    cfg = config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objectives = build_objectives(cfg, model)
    module = TrainingLoss(model, objectives).double().eval()
    mlm, itm = _objective(objectives, MaskedLanguageObjective), _objective(objectives, ImageTextMatchingObjective)
    _randomise(mlm.fusion)
    return cfg, model, objectives, module, mlm, itm


def test_mlm_and_itm_share_one_fusion_module_and_its_gradients_add_up():
    cfg, model, objectives, module, mlm, itm = _shared_setup()
    assert [o.name for o in objectives] == ["mlm", "itm"]
    assert mlm.fusion is itm.fusion and isinstance(itm.fusion, FusionBlocks)
    assert itm.fusion.points == FUSION
    fusion_ids = {id(p) for p in itm.fusion.parameters()}
    listed = [(n, p) for n, p in module.named_parameters() if id(p) in fusion_ids]
    assert len(listed) == len(fusion_ids) == len(list(itm.fusion.parameters()))
    assert all(".fusion." in n for n, _ in listed)
    optimized = [id(p) for g in build_optimizer(model, cfg, objectives).param_groups for p in g["params"]]
    assert len(optimized) == len(set(optimized)) and fusion_ids <= set(optimized)

    images, tokens = _batch()
    step = 1
    total, terms, _ = module(images, tokens, step, 4)
    assert terms["mlm_masked"] > 0 and terms["itm_negatives"] > 0
    total.backward()
    fusion = dict(itm.fusion.named_parameters())
    together = {n: p.grad.clone() for n, p in fusion.items()}

    alone = {}
    for objective in (mlm, itm):
        module.zero_grad(set_to_none=True)
        outputs = model(images, tokens, **forward_needs(objectives))
        ctx = StepContext(step=step, total_steps=4, images=images, tokens=tokens, model=model)
        loss = objective(outputs, ctx)[f"{objective.name}_loss"]
        assert float(loss.detach()) == pytest.approx(terms[f"{objective.name}_loss"], rel=1e-12)
        loss.backward()
        alone[objective.name] = {n: p.grad.clone() for n, p in fusion.items()}
    for n in fusion:
        g_mlm, g_itm = alone["mlm"][n], alone["itm"][n]
        assert g_mlm.abs().sum() > 0 and g_itm.abs().sum() > 0, n  # both objectives train every block
        torch.testing.assert_close(together[n], mlm.weight * g_mlm + itm.weight * g_itm, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(together[n], mlm.weight * g_mlm, rtol=1e-6, atol=0), n


def test_token_embedding_gradient_stays_dense_with_mlm_and_itm():
    """MLM's masked pass reads the embedding sparsely, ITM's whole-caption pass densely: their sum stays dense, as
    AdamW and gradient clipping need."""
    cfg, model, objectives, module, _, _ = _shared_setup()
    images, tokens = _batch()
    module(images, tokens, 0, 1)[0].backward()
    grad = model.text.token_embedding.weight.grad
    assert grad is not None and not grad.is_sparse and grad.layout == torch.strided
    optimizer = build_optimizer(model, cfg, objectives)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()


# ------------------------------------------------------------------------------------ 5. the loss by hand
def _hand_itm(model, itm, outputs, tokens, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (mean) and accuracy of (image, caption, label) examples: the text tower with the fusion blocks
    placed after the layers of FUSION, the end-of-text state, the head as a plain affine map."""
    image_idx = torch.tensor([e[0] for e in examples])
    caption_idx = torch.tensor([e[1] for e in examples])
    labels = torch.tensor([e[2] for e in examples])
    maps = {s: m[image_idx] for s, m in outputs["image_maps"].items()}
    pair_tokens = tokens[caption_idx]
    blocks = dict(zip(FUSION, itm.fusion))

    def after_layer(i: int, x: torch.Tensor) -> torch.Tensor:
        for (layer, stride), block in blocks.items():
            if layer == i:
                x = block(x, maps[stride])
        return x

    hidden = model.text.forward_tokens(pair_tokens, after_layer=after_layer, causal=False)[1]
    eot = torch.tensor([row.tolist().index(EOT) for row in pair_tokens])
    scores = hidden[torch.arange(len(examples)), eot] @ itm.head.weight.T + itm.head.bias
    return F.cross_entropy(scores, labels), (scores.argmax(1) == labels).double().mean()


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_itm_loss_equals_a_hand_computed_reference(negatives):
    cfg = config(mlm={**MLM, "enabled": False}, itm={**ITM, "negatives": negatives})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objectives = build_objectives(cfg, model)
    [itm] = objectives
    module = TrainingLoss(model, objectives).double().eval()
    _randomise(itm.fusion)
    images, tokens = _batch()
    step, b = 3, len(CAPTIONS)
    with torch.no_grad():
        total, step_terms, outputs = module(images, tokens, step, 4)
        terms = itm(outputs, StepContext(step=step, total_steps=4, images=images, tokens=tokens, model=model))
        # the draws of this step (generator keyed by seed, step and the rank's first row, 0 in one process)
        logits = outputs["logit_scale"] * outputs["image_features"] @ outputs["text_features"].T
        same = torch.tensor([[a == c for c in CAPTIONS] for a in CAPTIONS])
        gen = _generator(cfg.train.seed, step, 0)
        img_rows, neg_text = draw_negatives(negative_weights(logits, same, negatives), gen)
        txt_rows, neg_image = draw_negatives(negative_weights(logits.T, same, negatives), gen)
        assert img_rows.tolist() == txt_rows.tolist() == list(range(b))
        examples = ([(i, i, 1) for i in range(b)]
                    + [(int(i), int(c), 0) for i, c in zip(img_rows, neg_text)]  # image i, a negative caption
                    + [(int(i), int(c), 0) for c, i in zip(txt_rows, neg_image)])  # caption c, a negative image
        assert all(CAPTIONS[i] != CAPTIONS[c] for i, c, label in examples if label == 0)
        assert terms["itm_negatives"] == 2 * b
        loss, accuracy = _hand_itm(model, itm, outputs, tokens, examples)
        torch.testing.assert_close(terms["itm_loss"], loss, rtol=1e-10, atol=1e-12)
        assert float(terms["itm_accuracy"]) == pytest.approx(float(accuracy), rel=1e-6)
        # the step's logged term and weighted total (the same draws: the generator is keyed, not stateful)
        assert step_terms["itm_loss"] == pytest.approx(float(loss), rel=1e-10)
        assert float(total) == pytest.approx(itm.weight * float(loss), rel=1e-10)
        # the reference tells other negatives apart: a shift of the drawn captions changes the loss
        shifted = examples[:b] + [(i, (c + 1) % b if CAPTIONS[i] != CAPTIONS[(c + 1) % b] else c, 0)
                                  for i, c, _ in examples[b:]]
        assert abs(float(_hand_itm(model, itm, outputs, tokens, shifted)[0]) - float(loss)) > 1e-6

        # a batch of one repeated caption has no negative: the loss is over the matched pairs only
        repeated = trim_padding(tokenize([CAPTIONS[2]] * 4, MODEL["text"]["context_length"]))
        outputs = model(images[:4], repeated, **forward_needs(objectives))
        terms = itm(outputs, StepContext(step=step, total_steps=4, images=images[:4], tokens=repeated, model=model))
        assert terms["itm_negatives"] == 0
        loss, _ = _hand_itm(model, itm, outputs, repeated, [(i, i, 1) for i in range(4)])
        torch.testing.assert_close(terms["itm_loss"], loss, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ 6. config
def test_itm_without_mlm_builds_the_fusion_for_itm():
    cfg = config(mlm={**MLM, "enabled": False})
    model = build_model(cfg.model)
    objectives = build_objectives(cfg, model)
    [itm] = objectives
    assert isinstance(itm, ImageTextMatchingObjective) and itm.negatives == "hard" and itm.weight == 0.7
    assert isinstance(itm.fusion, FusionBlocks) and itm.fusion.points == FUSION and len(itm.fusion) == 3
    assert itm.image_strides == (8, 16, 32)
    assert forward_needs(objectives)["image_strides"] == (8, 16, 32)
    images, tokens = _batch(dtype=torch.float32)
    total, terms, _ = TrainingLoss(model, objectives)(images, tokens, 0, 1)
    assert set(terms) == {"loss", "itm_loss", "itm_accuracy", "itm_negatives"}
    assert math.isfinite(terms["itm_loss"]) and terms["loss"] == pytest.approx(0.7 * terms["itm_loss"], rel=1e-6)
    total.backward()
    assert all(p.grad is not None for p in itm.parameters())


def test_objective_order_is_contrastive_token_mlm_itm_distill():
    cfg = config(contrastive={"enabled": True}, token={"enabled": True, "image_stride": 16})
    objectives = build_objectives(cfg, build_model(cfg.model))
    assert [o.name for o in objectives] == ["contrastive", "token", "mlm", "itm"]
    assert objectives[2].fusion is objectives[3].fusion
    # with distillation on, the contrastive objective is CLIP's part of the distillation loss, not a term of its own
    cfg = config(contrastive={"enabled": True}, token={"enabled": True, "image_stride": 16},
                 distill={"enabled": True})
    objectives = build_objectives(cfg, build_model(cfg.model), {"dims": [8, 12], "scales": [100.0, 50.0]})
    assert [o.name for o in objectives] == ["token", "mlm", "itm", "distill"]
    assert objectives[3].clip.name == "contrastive" and objectives[1].fusion is objectives[2].fusion


def test_itm_without_a_fusion_point_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        validate({"objectives": {"itm": {"enabled": True}, "mlm": {"fusion": []}}})
    message = str(err.value)
    assert "objectives.mlm.fusion" in message and "objectives.itm.enabled" in message and "\n" not in message
    # MLM alone may run without fusion; ITM off with no fusion point is fine
    validate({"objectives": {"itm": {"enabled": False}, "mlm": {"fusion": []}}})
    with pytest.raises(ConfigError, match=r"objectives\.itm\.negatives"):
        validate({"objectives": {"itm": {"enabled": True, "negatives": "semi-hard"}}})
    with pytest.raises(ValueError, match="fusion point"):
        ImageTextMatchingObjective(32, FusionBlocks(32, 2, []))


def test_fusion_blocks_start_as_an_identity_unless_an_init_std_is_given():
    """`fusion_init_std: 0` (LightCLIP's default): every output projection is exactly zero, so the fused pass equals
    the text tower's own; `0.02`: normal weights of that spread (BERT/ALBEF), zero biases."""
    points = [(0, 8, 24), (1, 16, 32)]
    identity = FusionBlocks(64, 2, points)
    assert all(not b.attn.out_proj.weight.any() and not b.attn.out_proj.bias.any() for b in identity)
    torch.manual_seed(0)
    noisy = FusionBlocks(64, 2, points, init_std=0.02)
    weights = torch.cat([b.attn.out_proj.weight.flatten() for b in noisy])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    assert all(not b.attn.out_proj.bias.any() for b in noisy)
