"""The contrastive objective agrees with open_clip's reference ClipLoss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from lightclip_core.losses import contrastive_loss
from lightclip_core.losses.instance import ContrastiveObjective


@pytest.mark.parametrize("batch,dim,scale", [(2, 8, 1.0), (16, 32, 14.3), (64, 128, 100.0)])
def test_contrastive_loss_matches_open_clip(batch, dim, scale):
    g = torch.Generator().manual_seed(batch)
    img = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(scale, dtype=torch.float64)
    ours = contrastive_loss(img, txt, s)
    reference = ClipLoss()(img, txt, s)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


def test_contrastive_gradients_match_open_clip():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 16, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(12, 16, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    ours = torch.autograd.grad(contrastive_loss(img, txt, s), (img, txt, s))
    reference = torch.autograd.grad(ClipLoss()(img, txt, s), (img, txt, s))
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-6)


def test_perfectly_aligned_pairs_at_high_temperature_give_near_zero_loss():
    emb = torch.eye(8)
    assert contrastive_loss(emb, emb, torch.tensor(100.0)) < 1e-6


def test_objective_without_soft_targets_is_clip_and_returns_named_terms():
    g = torch.Generator().manual_seed(3)
    img, txt = (F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    terms = ContrastiveObjective()({"image_features": img, "text_features": txt, "logit_scale": scale})
    assert set(terms) == {"contrastive_loss"} and terms["contrastive_loss"].ndim == 0
    assert torch.allclose(terms["contrastive_loss"], ClipLoss()(img, txt, scale), atol=1e-6)
