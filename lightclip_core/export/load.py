"""Load an export directory (written by :func:`lightclip_core.export.exporter.export`): the inference API.

`config.json` rebuilds the architecture (folded when the export was reparameterized, with training-only modules
dropped), `model.safetensors` fills the weights, and the preprocessing and the tokenizer (from the vocabulary file
shipped in the directory) are rebuilt from the recorded metadata, so an exported model embeds images and texts
exactly as it was evaluated. Nothing here imports the training code.

Third-party evaluation code gets what CLIP_benchmark's model loaders return::

    model, transform, tokenizer = load_exported(path).clip_benchmark()
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import load_model

from lightclip_core.config import DEFAULT_TEMPLATES, ModelConfig
from lightclip_core.data.transforms import image_transform
from lightclip_core.export.format import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from lightclip_core.export.prune import drop_modules
from lightclip_core.export.reparam import reparameterize
from lightclip_core.infra.storage import read_versioned_json, sha256_file
from lightclip_core.models.clip import CLIP, zero_shot_weights
from lightclip_core.models.tokenizer import TOKENIZER_NAME, tokenizer_from_file


@dataclass
class ExportedModel:
    """An exported CLIP model in eval mode with its input pipeline.

    `model` has CLIP_benchmark's interface (`encode_image(images)`, `encode_text(tokens)`); the methods here also
    take PIL images and strings."""

    model: CLIP
    preprocess: Callable[[Any], torch.Tensor]
    context_length: int
    config: dict[str, Any]
    bpe: SimpleTokenizer = field(repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> model input `[3, size, size]` (open_clip and CLIP_benchmark call it the transform)."""
        return self.preprocess

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """`[N, context_length]` int64 token ids."""
        return self.bpe(texts, self.context_length)

    tokenizer = tokenize  # CLIP_benchmark's name

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor | Sequence[Image.Image], normalize: bool = True) -> torch.Tensor:
        """Embeddings `[N, D]` of a preprocessed batch `[N, 3, H, W]` or of PIL images."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(image) for image in images])
        return self.model.encode_image(images.to(self.device), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: torch.Tensor | str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Embeddings `[N, D]` of token ids `[N, L]` or of strings."""
        if not isinstance(texts, torch.Tensor):
            texts = self.tokenize([texts] if isinstance(texts, str) else list(texts))
        return self.model.encode_text(texts.to(self.device), normalize=normalize)

    def classifier(self, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """`[D, C]` zero-shot weights: per class, the mean of its normalised prompt embeddings, renormalised."""
        # clone: zero_shot_weights runs in inference mode, whose tensors autograd refuses (`scale() * ...` records)
        return zero_shot_weights(self.model, classnames, templates, self.tokenize).clone()

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor | Sequence[Image.Image], classnames: Sequence[str],
                  templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Class probabilities `[N, C]`: softmax over the scaled cosine similarity to each class."""
        logits = self.model.scale() * self.encode_image(images) @ self.classifier(classnames, templates)
        return logits.softmax(dim=-1)

    def clip_benchmark(self) -> tuple[CLIP, Callable[[Any], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
        """`(model, transform, tokenizer)`, what CLIP_benchmark's `load_clip` returns."""
        return self.model, self.transform, self.tokenize


def build_preprocess(meta: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The preprocessing recorded in config.json, exactly the transform used in training and evaluation."""
    return image_transform(int(meta["size"]), meta["mean"], meta["std"], meta["interpolation"])


def read_export_config(export_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(export_dir) / CONFIG_FILE
    config = read_versioned_json(path, "format_version", FORMAT_VERSION, "run `lightclip export` first")
    name = config["tokenizer"]["name"]
    if name != TOKENIZER_NAME:
        raise ValueError(f"{path}: tokenizer {name!r} is not this package's {TOKENIZER_NAME!r}")
    return config


def build_tokenizer(export_dir: str | os.PathLike, config: dict[str, Any]) -> SimpleTokenizer:
    """The tokenizer from the vocabulary file shipped in the export, checked against its recorded hash."""
    spec = config["tokenizer"]
    path = Path(export_dir) / spec["vocab_file"]
    if sha256_file(path) != spec["vocab_sha256"]:
        raise ValueError(f"{path}: the vocabulary file does not match the sha256 recorded in {CONFIG_FILE}")
    return tokenizer_from_file(path, int(spec["context_length"]))


def build_model_from_config(config: dict[str, Any]) -> CLIP:
    """The architecture described by `config.json` (folded and pruned as exported), randomly initialised."""
    model = CLIP(ModelConfig.model_validate(config["model_config"])).eval()
    if config.get("reparameterized"):
        reparameterize(model)
    drop_modules(model, config.get("dropped_modules", []))
    return model


def load_exported(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild the model from `config.json` + `model.safetensors` (strict) and its preprocessing and tokenizer."""
    config = read_export_config(export_dir)
    model = build_model_from_config(config)
    load_model(model, str(Path(export_dir) / WEIGHTS_FILE), strict=True, device=str(device))
    return ExportedModel(model=model.to(device).eval(), preprocess=build_preprocess(config["preprocess"]),
                         context_length=int(config["tokenizer"]["context_length"]), config=config,
                         bpe=build_tokenizer(export_dir, config))
