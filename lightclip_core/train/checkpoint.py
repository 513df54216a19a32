"""Checkpoints: written atomically (temporary file, then rename), checksummed, read with `weights_only=True`.

A checkpoint `step-NNNNNNNN.pt` is a plain `torch.save` file; its sha256 lives in a sidecar `step-NNNNNNNN.pt.sha256`
(`sha256sum` format, so `sha256sum -c` checks it too), published after the checkpoint. A checkpoint without its
sidecar (a kill between the two renames) or whose bytes do not match it (truncation, corruption) is invalid, and
resuming falls back to the previous one. Old checkpoints are pruned only after a new one is complete.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from lightclip_core.infra.storage import atomic_path, sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"step-(\d+)\.pt$")
CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint is missing its checksum, does not match it, or cannot be read."""


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, containers of them) to `path` atomically, then its checksum."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
    write_bytes_atomic(checksum_path(path), f"{digest}  {path.name}\n".encode())
    return path


def verify_checkpoint(path: str | os.PathLike, require_checksum: bool = True) -> None:
    """Raise CheckpointError if `path`'s bytes do not match its sidecar checksum (or, when required, it has none)."""
    path, sidecar = Path(path), checksum_path(path)
    if not sidecar.is_file():
        if require_checksum:
            raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name} (its write did not finish)")
        return
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} does not match its sha256 ({actual[:12]}... != {expected[:12]}...): "
                              f"truncated or corrupted")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    require_checksum: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects. Its checksum is
    verified when the sidecar is there (and required with `require_checksum`)."""
    verify_checkpoint(path, require_checksum)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `directory`, oldest first."""
    d = Path(directory)
    found = [p for p in d.glob("step-*.pt") if _NAME.search(p.name)] if d.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


def remove_checkpoint(path: str | os.PathLike) -> None:
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        remove_checkpoint(old)


def remove_partial_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted; returns what was removed."""
    d = Path(directory)
    partial = sorted(d.glob(".step-*.tmp")) if d.is_dir() else []
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def newest_valid_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that verifies and loads, with its state; None if there is none. Each
    invalid newer one is named in a warning and renamed to `<name>.corrupt` (kept for inspection, out of the way of
    pruning)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, require_checksum=True)
        except CheckpointError as err:
            log.warning("%s; renamed to %s.corrupt, trying the previous checkpoint", err, path.name)
            os.replace(path, path.with_name(path.name + ".corrupt"))
            checksum_path(path).unlink(missing_ok=True)
    return None
