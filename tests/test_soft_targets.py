"""LightCLIP's softened instance-level alignment, checked against independent references: open_clip's ClipLoss
for eps = 0, torch's probability-target cross-entropy, and hand-built targets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from lightclip_core.losses.instance import eps_at, similarity_targets, soft_clip_loss, uniform_targets


def _features(n: int, d: int = 16, seed: int = 0, dtype=torch.float64, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return img.requires_grad_(grad), txt.requires_grad_(grad)


# ------------------------------------------------------------------------------------------ eps = 0 is CLIP
@pytest.mark.parametrize("kind", ["uniform", "similarity"])
@pytest.mark.parametrize("n", [1, 2, 7, 32])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_eps_zero_is_clip_loss(kind, n, scale):
    img, txt = _features(n, seed=n, grad=True)
    img_ref, txt_ref = (t.detach().clone().requires_grad_(True) for t in (img, txt))
    logit_scale = torch.tensor(scale, dtype=torch.float64)

    ours = soft_clip_loss(img, txt, logit_scale, eps=0.0, kind=kind)
    ref = ClipLoss()(img_ref, txt_ref, logit_scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)

    ours.backward()
    ref.backward()
    torch.testing.assert_close(img.grad, img_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt.grad, txt_ref.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "similarity"])
def test_vanishing_eps_is_continuous_with_clip(kind):
    img, txt = _features(9, seed=3)
    scale = torch.tensor(20.0, dtype=torch.float64)
    ref = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(soft_clip_loss(img, txt, scale, eps=1e-12, kind=kind), ref, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 0.9])
def test_uniform_targets(n, eps):
    y = uniform_targets(n, eps, dtype=torch.float64)
    assert y.shape == (n, n) and y.dtype == torch.float64
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(1), torch.ones(n, dtype=torch.float64))
    eye = torch.eye(n, dtype=torch.bool)
    assert torch.all(y[eye] == 1 - eps)
    torch.testing.assert_close(y[~eye], torch.full((n * (n - 1),), eps / (n - 1), dtype=torch.float64))


def test_single_pair_targets_are_one():
    assert torch.equal(uniform_targets(1, 0.3), torch.ones(1, 1))
    assert torch.equal(similarity_targets(torch.randn(1, 1), 0.3, 0.5), torch.ones(1, 1))


@pytest.mark.parametrize("n", [2, 6, 13])
@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 3.0])
def test_similarity_targets_match_a_hand_softmax_over_negatives(n, eps, temperature):
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 5
    y = similarity_targets(sim, eps, temperature)
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(1), torch.ones(n, dtype=torch.float64))
    assert torch.all(torch.diagonal(y) == 1 - eps)
    for i in range(n):
        negatives = [j for j in range(n) if j != i]
        logits = [sim[i, j].item() / temperature for j in negatives]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        for j, w in zip(negatives, weights):
            assert y[i, j].item() == pytest.approx(eps * w / total, rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------------------------ the loss
def _reference_loss(img, txt, scale, targets_image, targets_text):
    logits = scale * img @ txt.T
    return 0.5 * (F.cross_entropy(logits, targets_image) + F.cross_entropy(logits.T, targets_text))


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("n", [2, 8])
def test_uniform_loss_matches_probability_target_cross_entropy(eps, n):
    img, txt = _features(n, seed=11)
    scale = torch.tensor(30.0, dtype=torch.float64)
    y = torch.full((n, n), eps / (n - 1), dtype=torch.float64)
    y.fill_diagonal_(1 - eps)
    ref = _reference_loss(img, txt, scale, y, y)
    torch.testing.assert_close(soft_clip_loss(img, txt, scale, eps, "uniform"), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("given", [True, False])
def test_similarity_loss_matches_probability_target_cross_entropy(eps, temperature, given):
    n = 8
    img, txt = _features(n, seed=5)
    scale = torch.tensor(25.0, dtype=torch.float64)
    if given:  # an asymmetric teacher similarity, so a wrong transpose would show
        sim = torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    else:
        sim = scale * img @ txt.T

    def hand_targets(m):
        z = (m / temperature).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
        return (1 - eps) * torch.eye(n, dtype=torch.float64) + eps * torch.softmax(z, dim=1)

    ref = _reference_loss(img, txt, scale, hand_targets(sim), hand_targets(sim.T))
    ours = soft_clip_loss(img, txt, scale, eps, "similarity", similarity=sim if given else None,
                          temperature=temperature)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_soft_targets_change_the_loss_and_its_gradient():
    img, txt = _features(8, seed=2, grad=True)
    scale = torch.tensor(10.0, dtype=torch.float64)
    clip = soft_clip_loss(img, txt, scale, 0.0)
    soft = soft_clip_loss(img, txt, scale, 0.3)
    assert not torch.isclose(clip, soft)
    (g_clip,) = torch.autograd.grad(clip, img)
    (g_soft,) = torch.autograd.grad(soft, img)
    assert not torch.allclose(g_clip, g_soft)


def test_no_gradient_flows_into_the_similarity():
    img, txt = _features(6, seed=4, grad=True)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    sim = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    soft_clip_loss(img, txt, scale, 0.3, "similarity", similarity=sim, temperature=0.5).backward()
    assert sim.grad is None
    assert img.grad is not None and txt.grad is not None and scale.grad is not None


def test_default_similarity_is_stop_gradient():
    """With no teacher the targets come from the detached student logits: the gradient equals the one with those
    targets held fixed."""
    n, eps = 7, 0.3
    img, txt = _features(n, seed=9, grad=True)
    scale = torch.tensor(15.0, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(soft_clip_loss(img, txt, scale, eps, "similarity"), img)
    fixed = (scale * img @ txt.T).detach()
    ref = soft_clip_loss(img, txt, scale, eps, "similarity", similarity=fixed)
    (g_ref,) = torch.autograd.grad(ref, img)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def test_float32_and_single_pair():
    img, txt = _features(4, dtype=torch.float32)
    loss = soft_clip_loss(img, txt, torch.tensor(50.0), 0.2, "similarity")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    one_img, one_txt = _features(1)
    for kind in ("uniform", "similarity"):
        assert soft_clip_loss(one_img, one_txt, torch.tensor(10.0, dtype=torch.float64), 0.3, kind).item() == 0.0


# ------------------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("start,end", [(0.0, 0.3), (0.1, 0.5), (0.4, 0.2)])
def test_eps_at_endpoints(schedule, start, end):
    total = 11
    assert eps_at(0, total, schedule, start, end) == pytest.approx(start, abs=1e-15)
    assert eps_at(total - 1, total, schedule, start, end) == pytest.approx(end, abs=1e-15)
    assert eps_at(5 * total, total, schedule, start, end) == pytest.approx(end, abs=1e-15)  # clipped
    assert eps_at(-3, total, schedule, start, end) == pytest.approx(start, abs=1e-15)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_eps_at_is_monotone(schedule):
    values = [eps_at(s, 50, schedule, 0.05, 0.4) for s in range(50)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0.05 <= v <= 0.4 for v in values)


def test_eps_at_constant_and_midpoints():
    assert all(eps_at(s, 10, "constant", 0.0, 0.25) == 0.25 for s in range(10))
    assert eps_at(5, 11, "cosine", 0.1, 0.5) == pytest.approx(0.3, abs=1e-15)
    assert eps_at(5, 11, "linear", 0.1, 0.5) == pytest.approx(0.3, abs=1e-15)
    assert eps_at(2, 11, "linear", 0.0, 0.5) == pytest.approx(0.1, abs=1e-15)
    assert eps_at(0, 1, "linear", 0.1, 0.5) == pytest.approx(0.1)  # a single step stays at the start


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("call,name", [
    (lambda: eps_at(0, 0, "linear", 0.0, 0.1), "total_steps"),
    (lambda: eps_at(0, 10, "step", 0.0, 0.1), "schedule"),
    (lambda: eps_at(0, 10, "linear", -0.1, 0.1), "eps_start"),
    (lambda: eps_at(0, 10, "linear", 0.0, 1.0), "eps_end"),
    (lambda: uniform_targets(4, 1.0), "eps"),
    (lambda: uniform_targets(4, -0.01), "eps"),
    (lambda: similarity_targets(torch.zeros(3, 3), 1.5, 1.0), "eps"),
    (lambda: similarity_targets(torch.zeros(3, 3), 0.1, 0.0), "temperature"),
    (lambda: similarity_targets(torch.zeros(3, 4), 0.1, 1.0), "sim"),
    (lambda: soft_clip_loss(*_features(3), torch.tensor(1.0), 1.0), "eps"),
    (lambda: soft_clip_loss(*_features(3), torch.tensor(1.0), 0.1, kind="ema"), "kind"),
    (lambda: soft_clip_loss(*_features(3), torch.tensor(1.0), 0.1, "similarity", temperature=-1.0), "temperature"),
    (lambda: soft_clip_loss(*_features(3), torch.tensor(1.0), 0.1, "similarity", similarity=torch.zeros(2, 2)),
     "similarity"),
])
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()
