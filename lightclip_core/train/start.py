"""The weights a run starts from (`model.init_from`): loaded strictly into the freshly built model at step 0, kept as
`start_model` in the checkpoints (the export interpolates between them and the fine-tuned weights, WiSE-FT) and
hashed into the train fingerprint, so that a run from other weights never resumes this run's checkpoints.

Where the weights come from (a checkpoint, an export, a registered model, `s3://`) is the stage's business
(:mod:`lightclip_core.stages.start`); the trainer receives them as a state dict."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from lightclip_core.config import ConfigError

START_KEY = "start_model"  # the checkpoints' copy of the model's state dict at step 0


def first_difference(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """How `given` (a state dict) first departs from `expected`'s names and shapes, in `expected`'s order; None if
    they agree."""
    for name, tensor in expected.items():
        if name not in given:
            return f"{name!r} is missing"
        if tuple(given[name].shape) != tuple(tensor.shape):
            return f"{name!r} has shape {list(given[name].shape)}, the model's is {list(tensor.shape)}"
    extra = [name for name in given if name not in expected]
    return f"{extra[0]!r} is not in the model" if extra else None


def load_start(model: nn.Module, start: Mapping[str, torch.Tensor] | None, init_from: str | None
               ) -> dict[str, torch.Tensor] | None:
    """Load `start` into `model` (strictly: the names and shapes of the start weights must be the model's) and return a
    CPU copy of the model's state dict at step 0; None, touching nothing, without start weights. `init_from` says
    where they come from (`ModelConfig.start_source()`: `model.init_from` or the open_clip student's pretrained)."""
    if (start is None) != (init_from is None):
        raise ValueError(f"start weights {init_from!r} need their state dict (resolved by the train stage) and a state "
                         f"dict needs a source (model.init_from or model.open_clip.pretrained); got "
                         f"{'none' if start is None else 'weights'}")
    if start is None:
        return None
    problem = first_difference(model.state_dict(), start)
    if problem is not None:
        raise ConfigError(f"model.init_from={init_from!r}: its weights are not this model's ({problem}); allowed: "
                          f"weights of the architecture in params.yaml's `model` section")
    model.load_state_dict(start, strict=True)
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict: its names, dtypes, shapes and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
