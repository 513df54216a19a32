"""A training run's student before its first update, as `lightclip train` builds it (start weights resolved and
loaded): shared by the tests of `model.init_from` and of the open_clip student."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightclip_core.config import Config
from lightclip_core.stages.model import run_train
from lightclip_core.train import trainer as trainer_module


class Stop(BaseException):
    """Ends a training run where the test has seen what it needed."""


def capture_at_optimizer(mp: pytest.MonkeyPatch, stop: bool = True) -> list[dict]:
    """What the trainer holds when it builds the optimizer (after the model, its start weights and the objectives;
    before any update): a copy of the model and the global RNG state."""
    seen: list[dict] = []
    real = trainer_module.build_optimizer

    def capture(model, cfg, objectives=None):
        seen.append({"model": copy.deepcopy(model).eval(), "rng": torch.get_rng_state()})
        if stop:
            raise Stop
        return real(model, cfg, objectives)

    mp.setattr(trainer_module, "build_optimizer", capture)
    return seen


def student_at_step_0(cfg: Config, data: Path, out: Path) -> dict:
    """The student of `lightclip train` (the stage, which resolves `model.init_from`) before its first update."""
    with pytest.MonkeyPatch.context() as mp:
        seen = capture_at_optimizer(mp)
        with pytest.raises(Stop):
            run_train(cfg=cfg, data=data, out=out)
    return seen[0]
