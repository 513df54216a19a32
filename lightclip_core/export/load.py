"""Load an export directory (written by :func:`lightclip_core.export.exporter.export`) without the checkpoint.

`config.json` rebuilds the architecture, `model.safetensors` fills the weights; the preprocessing and the
tokenizer are reconstructed from the recorded metadata, so an exported model embeds images and texts exactly as
it was evaluated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_model

from lightclip_core.config import ModelConfig
from lightclip_core.data import tokenizer
from lightclip_core.data.storage import read_versioned_json
from lightclip_core.data.transforms import image_transform
from lightclip_core.export.exporter import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from lightclip_core.models.clip import CLIP

@dataclass
class ExportedModel:
    """An exported CLIP model in eval mode with its input pipeline."""

    model: CLIP
    preprocess: Callable[[Any], torch.Tensor]
    context_length: int
    config: dict[str, Any]

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return tokenizer.tokenize(texts, self.context_length)


def build_preprocess(meta: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The preprocessing recorded in config.json, exactly the transform used in training and evaluation."""
    return image_transform(int(meta["size"]), meta["mean"], meta["std"], meta["interpolation"])


def read_export_config(export_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(export_dir) / CONFIG_FILE
    config = read_versioned_json(path, "format_version", FORMAT_VERSION, "run `lightclip export` first")
    name = config["tokenizer"]["name"]
    if name != tokenizer.TOKENIZER_NAME:
        raise ValueError(f"{path}: tokenizer {name!r} is not this package's {tokenizer.TOKENIZER_NAME!r}")
    return config


def build_model_from_config(config: dict[str, Any]) -> CLIP:
    """The architecture described by `config.json`, randomly initialised."""
    return CLIP(ModelConfig.model_validate(config["model_config"]))


def load_exported(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild the model from `config.json` + `model.safetensors` (strict) and its preprocessing and tokenizer."""
    config = read_export_config(export_dir)
    model = build_model_from_config(config)
    load_model(model, str(Path(export_dir) / WEIGHTS_FILE), strict=True, device=str(device))
    return ExportedModel(model=model.to(device).eval(), preprocess=build_preprocess(config["preprocess"]),
                         context_length=int(config["tokenizer"]["context_length"]), config=config)
