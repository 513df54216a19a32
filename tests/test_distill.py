"""MobileCLIP's distillation loss against independent references: open_clip's DistillClipLoss (one teacher, value and
gradients), a float64 numpy/scipy loop (two teachers of different widths and scales; probabilities averaged, not
logits), open_clip's ClipLoss (lam = 0), the caption-batch split, a one-hot teacher, gradient flow and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss
from scipy.special import log_softmax, softmax

from lightclip_core.config import Config
from lightclip_core.losses import StepContext, contrastive_loss
from lightclip_core.losses.distill import DistillationObjective, distillation_kd, mobileclip_loss, teacher_probabilities
from lightclip_core.losses.instance import ContrastiveObjective
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import tokenize, trim_padding

MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
         "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 2}}
CAPTIONS = ["a red circle", "two green triangles next to a star", "a purple square", "cat and dog"]
SYNTHETIC = ["a round red shape on blue", "green shapes and a yellow star", "a violet box", "two pets"]
DIMS, SCALES = [8, 12], [100.0, 50.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def teachers(b: int, dims: list[int], seed: int) -> torch.Tensor:
    """K teachers' normalised embeddings side by side, stored as fp16 (as in a reinforced dataset)."""
    return torch.cat([unit(b, d, seed=seed + k) for k, d in enumerate(dims)], dim=1).half()


@pytest.fixture
def setup():
    """A tiny real CLIP in eval mode, a batch with reinforced extras, and the model's outputs."""
    torch.manual_seed(0)
    model = build_model(Config.model_validate({"model": MODEL}).model).eval()
    b, ctx_len = len(CAPTIONS), MODEL["text"]["context_length"]
    images, tokens = torch.randn(b, 3, 32, 32), trim_padding(tokenize(CAPTIONS, ctx_len))
    extras = {"teacher_image_emb": teachers(b, DIMS, 10), "teacher_text_emb": teachers(b, DIMS, 20),
              "syn_tokens": tokenize(SYNTHETIC, ctx_len), "teacher_syn_text_emb": teachers(b, DIMS, 30)}
    ctx = StepContext(step=0, total_steps=1, images=images, tokens=tokens, model=model, extras=extras)
    return model, ctx, model(images, tokens)


def test_one_teacher_matches_open_clip_distill_clip_loss():
    # open_clip: dist_loss(t, s) = -(t.softmax(1) * s.log_softmax(1)).sum(1).mean(0), averaged over both directions
    # (its output_dict key is "distill_loss"); it takes the teacher features as given, so they are passed normalised
    b, d, dt = 6, 16, 10
    image, text = unit(b, d, seed=1).requires_grad_(), unit(b, d, seed=2).requires_grad_()
    t_img, t_txt, scale = unit(b, dt, seed=3), unit(b, dt, seed=4), torch.tensor(20.0)
    ours = distillation_kd(image, text, scale, t_img, t_txt, [dt], [70.0])
    ref = DistillClipLoss()(image, text, scale, t_img, t_txt, torch.tensor(70.0), output_dict=True)["distill_loss"]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(torch.autograd.grad(ours, (image, text)), torch.autograd.grad(ref, (image, text))):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


def reference_kd(image, text, scale, t_img, t_txt, dims, scales, average="probabilities") -> float:
    """Float64 loops over teachers and rows; `average="logits"` is the wrong recipe, for contrast."""
    image, text, t_img, t_txt = (np.asarray(x, dtype=np.float64) for x in (image, text, t_img, t_txt))
    s_logits, b, bounds = scale * image @ text.T, image.shape[0], np.cumsum([0, *dims])
    directions = []
    for student, transpose in ((s_logits, False), (s_logits.T, True)):
        target, logits_sum = np.zeros((b, b)), np.zeros((b, b))
        for k, teacher_scale in enumerate(scales):
            ti, tt = t_img[:, bounds[k]:bounds[k + 1]], t_txt[:, bounds[k]:bounds[k + 1]]
            ti, tt = ti / np.linalg.norm(ti, axis=1, keepdims=True), tt / np.linalg.norm(tt, axis=1, keepdims=True)
            logits = teacher_scale * (tt @ ti.T if transpose else ti @ tt.T)
            for i in range(b):
                target[i] += softmax(logits[i]) / len(scales)
                logits_sum[i] += logits[i] / len(scales)
        if average == "logits":
            target = np.stack([softmax(logits_sum[i]) for i in range(b)])
        directions.append(np.mean([-(target[i] * log_softmax(student[i])).sum() for i in range(b)]))
    return 0.5 * sum(directions)


def test_two_teachers_match_float64_reference_and_average_probabilities():
    b = 5
    image, text = unit(b, 16, seed=1), unit(b, 16, seed=2)
    t_img, t_txt = teachers(b, DIMS, 3), teachers(b, DIMS, 5)
    ours = distillation_kd(image, text, torch.tensor(30.0), t_img, t_txt, DIMS, SCALES).item()
    args = (image, text, 30.0, t_img.float(), t_txt.float(), DIMS, SCALES)
    assert ours == pytest.approx(reference_kd(*args), abs=1e-5)
    assert abs(ours - reference_kd(*args, average="logits")) > 0.05
    p_img, p_txt = teacher_probabilities(t_img, t_txt, DIMS, SCALES)
    torch.testing.assert_close(p_img.sum(1), torch.ones(b))
    torch.testing.assert_close(p_txt.sum(1), torch.ones(b))


def objective_total(ctx, outputs, **kwargs) -> torch.Tensor:
    return DistillationObjective(DIMS, SCALES, **kwargs)(outputs, ctx)["distill_loss"]


def test_lam_mixes_clip_and_kd(setup):
    model, ctx, out = setup
    image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
    syn = model.encode_text(trim_padding(ctx.extras["syn_tokens"]), normalize=True)
    with torch.no_grad():
        clip = ClipLoss()(image, text, scale) + ClipLoss()(image, syn, scale)
        kd = (distillation_kd(image, text, scale, ctx.extras["teacher_image_emb"], ctx.extras["teacher_text_emb"],
                              DIMS, SCALES)
              + distillation_kd(image, syn, scale, ctx.extras["teacher_image_emb"],
                                ctx.extras["teacher_syn_text_emb"], DIMS, SCALES))
        assert torch.equal(objective_total(ctx, out, lam=0.0), clip)
        torch.testing.assert_close(objective_total(ctx, out, lam=1.0), kd, rtol=0, atol=1e-6)
        torch.testing.assert_close(objective_total(ctx, out, lam=0.5), 0.5 * clip + 0.5 * kd, rtol=0, atol=1e-6)
        assert abs(clip - kd) > 1e-2  # the three cases are distinguishable


def test_caption_batches_both_is_real_plus_synthetic(setup):
    _, ctx, out = setup
    with torch.no_grad():
        both = DistillationObjective(DIMS, SCALES, lam=0.3)(out, ctx)
        real = objective_total(ctx, out, lam=0.3, caption_batches="real")
        syn = objective_total(ctx, out, lam=0.3, caption_batches="synthetic")
    torch.testing.assert_close(both["distill_loss"], real + syn, rtol=0, atol=1e-6)
    assert sorted(both) == ["distill_clip_real", "distill_clip_syn", "distill_kd_real", "distill_kd_syn",
                            "distill_loss"]
    assert [k for k in both if k.endswith("_loss")] == ["distill_loss"]
    real_terms = DistillationObjective(DIMS, SCALES, caption_batches="real")(out, ctx)
    assert sorted(real_terms) == ["distill_clip_real", "distill_kd_real", "distill_loss"]


def reference_soft_clip(image: torch.Tensor, text: torch.Tensor, scale: float, eps: float) -> float:
    """LightCLIP's uniformly softened InfoNCE in float64: targets (1 - eps) on the pair, eps / (n - 1) elsewhere."""
    logits = scale * image.detach().double().numpy() @ text.detach().double().numpy().T
    n = len(logits)
    targets = np.full((n, n), eps / (n - 1))
    np.fill_diagonal(targets, 1 - eps)
    return float(0.5 * (-(targets * log_softmax(logits, axis=1)).sum(1).mean()
                        - (targets * log_softmax(logits.T, axis=1)).sum(1).mean()))


def test_one_instance_term_takes_the_contrastive_objectives_targets(setup):
    """Issue #16: with a contrastive objective, CLIP's part of L(B) on each caption batch is its (softened) loss:
    total = (1 - lam) * [soft(real) + soft(syn)] + lam * [KD(real) + KD(syn)], against a float64 reference; at
    lam = 1 the CLIP part carries no gradient."""
    model, ctx, out = setup
    image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
    syn = model.encode_text(trim_padding(ctx.extras["syn_tokens"]), normalize=True)
    eps = 0.3
    clip = ContrastiveObjective("uniform", "constant", eps_end=eps)
    terms = DistillationObjective(DIMS, SCALES, lam=0.25, clip=clip)(out, ctx)
    with torch.no_grad():
        kd = (distillation_kd(image, text, scale, ctx.extras["teacher_image_emb"], ctx.extras["teacher_text_emb"],
                              DIMS, SCALES)
              + distillation_kd(image, syn, scale, ctx.extras["teacher_image_emb"],
                                ctx.extras["teacher_syn_text_emb"], DIMS, SCALES))
    soft = {tag: reference_soft_clip(image, t, scale.item(), eps) for tag, t in (("real", text), ("syn", syn))}
    assert abs(soft["real"] - ClipLoss()(image, text, scale).item()) > 1e-3  # the softened loss, not CLIP's own
    assert terms["distill_clip_real"].item() == pytest.approx(soft["real"], abs=1e-5)
    assert terms["distill_clip_syn"].item() == pytest.approx(soft["syn"], abs=1e-5)
    assert terms["soft_eps"] == eps and [k for k in terms if k.endswith("_loss")] == ["distill_loss"]
    assert terms["distill_loss"].item() == pytest.approx(0.75 * sum(soft.values()) + 0.25 * kd.item(), abs=1e-5)
    kd_only = DistillationObjective(DIMS, SCALES, lam=1.0, clip=clip)(out, ctx)
    assert kd_only["distill_loss"].item() == pytest.approx(kd.item(), abs=1e-5)
    assert not kd_only["distill_clip_real"].requires_grad and kd_only["distill_loss"].requires_grad


def test_the_synthetic_batchs_ema_similarity_reads_its_own_captions(setup):
    """With EMA similarity targets, each caption batch's softened targets come from the EMA model on that batch's
    captions: while the EMA copy equals the model (at the start), that is the model's own similarity on the batch."""
    model, ctx, out = setup
    clip = ContrastiveObjective("similarity", "constant", eps_end=0.4, ema_of=model)
    objective = DistillationObjective(DIMS, SCALES, lam=0.0, caption_batches="synthetic", clip=clip)
    with torch.no_grad():
        got = objective(out, ctx)["distill_clip_syn"]
        syn = model.encode_text(trim_padding(ctx.extras["syn_tokens"]), normalize=True)
        own = ContrastiveObjective("similarity", "constant", eps_end=0.4)({**out, "text_features": syn}, ctx)
        real_targets = clip({**out, "text_features": syn}, ctx)  # the EMA on the real captions: other targets
    torch.testing.assert_close(got, own["contrastive_loss"], rtol=0, atol=1e-5)
    assert abs(real_targets["contrastive_loss"] - got) > 1e-3
    assert not any(p.requires_grad for p in objective.parameters())  # the EMA copy is frozen


def test_one_hot_teacher_reduces_kd_to_clip():
    b, d = 6, 16
    image, text, scale = unit(b, d, seed=1), unit(b, d, seed=2), torch.tensor(15.0)
    basis = torch.eye(b, d)  # orthonormal rows: teacher logits s_k * I, one-hot at a huge scale
    p_img, p_txt = teacher_probabilities(basis, basis, [d], [1e4])
    assert torch.equal(p_img, torch.eye(b)) and torch.equal(p_txt, torch.eye(b))
    kd = distillation_kd(image, text, scale, basis, basis, [d], [1e4])
    torch.testing.assert_close(kd, contrastive_loss(image, text, scale), rtol=0, atol=1e-5)
    total, clip, _ = mobileclip_loss(image, text, scale, basis, basis, [d], [1e4], lam=0.5)
    torch.testing.assert_close(total, clip, rtol=0, atol=1e-5)


def test_gradients_reach_the_synthetic_pass_but_not_the_teachers(setup):
    model, ctx, out = setup
    for key in ("teacher_image_emb", "teacher_syn_text_emb"):
        ctx.extras[key] = ctx.extras[key].float().requires_grad_()
    model.zero_grad()
    objective_total(ctx, out, lam=0.5, caption_batches="synthetic").backward()
    for key in ("teacher_image_emb", "teacher_syn_text_emb"):
        grad = ctx.extras[key].grad
        assert grad is None or not grad.any()
    text_grads = [p.grad for p in model.text.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in text_grads)
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_errors(setup):
    _, ctx, out = setup
    t = torch.zeros(4, 768)
    with pytest.raises(ValueError, match=r"768 != .*\[512, 128\] = 640"):
        teacher_probabilities(t, t, [512, 128], [100.0, 100.0])
    with pytest.raises(ValueError, match="scale"):
        teacher_probabilities(t, t, [512, 256], [100.0])
    del ctx.extras["teacher_syn_text_emb"]
    with pytest.raises(ValueError, match=r"lightclip reinforce.*teacher_syn_text_emb"):
        DistillationObjective(DIMS, SCALES)(out, ctx)
    DistillationObjective(DIMS, SCALES, caption_batches="real")(out, ctx)  # the real batch needs no synthetic keys
    for kwargs in ({"lam": 1.5}, {"lam": -0.1}, {"caption_batches": "all"}):
        with pytest.raises(ValueError):
            DistillationObjective(DIMS, SCALES, **kwargs)
    for dims, scales in (([8, 0], SCALES), (DIMS, [100.0, 0.0]), (DIMS, [100.0])):
        with pytest.raises(ValueError):
            DistillationObjective(dims, scales)
    assert list(DistillationObjective(DIMS, SCALES).parameters()) == []


def reference_feature_l2(student: torch.Tensor, teacher: torch.Tensor, weights: list[np.ndarray], dims) -> float:
    """F(x, T) in float64 with a loop over teachers and rows."""
    x, t = student.detach().double().numpy(), teacher.double().numpy()
    per_teacher, start = [], 0
    for w, d in zip(weights, dims):
        rows = []
        for i in range(x.shape[0]):
            p, q = w @ x[i], t[i, start:start + d]
            rows.append(np.sum((p / np.linalg.norm(p) - q / np.linalg.norm(q)) ** 2))
        per_teacher.append(np.mean(rows))
        start += d
    return float(np.mean(per_teacher))


def test_feature_distillation_adds_the_l2_terms_to_kd(setup):
    """feature_weight w: the loss is the KD loss plus w * (F(v, T_img) + F(u_real, T_txt) + F(u_syn, T_syn)), each F
    against a float64 loop with the objective's own projections; the projections and both towers get gradients."""
    model, ctx, out = setup
    torch.manual_seed(3)
    objective = DistillationObjective(DIMS, SCALES, lam=1.0, feature_weight=0.5, embed_dim=MODEL["embed_dim"])
    terms = objective(out, ctx)
    with torch.no_grad():
        kd_only = objective_total(ctx, out, lam=1.0)
    syn = model.encode_text(trim_padding(ctx.extras["syn_tokens"]), normalize=True)
    expected = {"image": (out["image_features"], "teacher_image_emb", objective.image_projections),
                "real": (out["text_features"], "teacher_text_emb", objective.text_projections),
                "syn": (syn, "teacher_syn_text_emb", objective.text_projections)}
    features = 0.0
    for tag, (student, key, projections) in expected.items():
        weights = [p.weight.detach().double().numpy() for p in projections]
        ref = reference_feature_l2(student, ctx.extras[key], weights, DIMS)
        assert abs(float(terms[f"distill_feature_{tag}"]) - ref) < 1e-5, tag
        features += ref
    assert abs(terms["distill_loss"].item() - (float(kd_only) + 0.5 * features)) < 1e-4
    model.zero_grad()
    terms["distill_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
    for tower in (model.visual, model.text):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_feature_distillation_needs_the_embedding_width():
    with pytest.raises(ValueError, match="embed_dim"):
        DistillationObjective(DIMS, SCALES, feature_weight=1.0)
    with pytest.raises(ValueError, match="feature_weight"):
        DistillationObjective(DIMS, SCALES, feature_weight=-1.0, embed_dim=16)
