"""Checkpoints: written atomically (temporary file, then rename), read with `weights_only=True`."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from lightclip_core.data.storage import atomic_path

_NAME = re.compile(r"step-(\d+)\.pt$")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, containers of them) to `path` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `directory`, oldest first."""
    d = Path(directory)
    found = [p for p in d.glob("step-*.pt") if _NAME.search(p.name)] if d.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
