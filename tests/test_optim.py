"""`adamw`, the stages' optimizer, is torch's fused AdamW where the parameters allow it: it changes the speed, not the
algorithm. Its trajectory equals the single-tensor AdamW's (the reference) to float rounding, and a checkpoint of
either form resumes in the other."""
from __future__ import annotations

import torch
from torch import nn

from lightclip_core.train.optim import adamw


def _trajectory(make_optimizer, steps: int = 20) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 3e-3}]
    optimizer = make_optimizer(groups)
    data = torch.randn(steps, 32, 8)
    for x in data:
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer


def test_fused_adamw_follows_the_single_tensor_adamw():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    fused, optimizer = _trajectory(lambda g: adamw(g, **kwargs))
    reference, _ = _trajectory(lambda g: torch.optim.AdamW(g, foreach=False, **kwargs))
    assert optimizer.defaults["fused"] is True
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_single_tensor_adamw_checkpoint_resumes_in_the_fused_one():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    _, reference = _trajectory(lambda g: torch.optim.AdamW(g, foreach=False, **kwargs), steps=3)
    _, fused = _trajectory(lambda g: adamw(g, **kwargs), steps=1)
    fused.load_state_dict(reference.state_dict())
    for a, b in zip(fused.state.values(), reference.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[key], b[key])


def test_a_parameter_off_the_fused_devices_falls_back():
    meta = nn.Parameter(torch.zeros(2, device="meta"))
    assert adamw([meta], lr=1e-3).defaults["fused"] is False
