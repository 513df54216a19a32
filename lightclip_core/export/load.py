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
from lightclip_core.models.clip import CLIP, build_model, zero_shot_weights
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


def training_model(config: dict[str, Any]) -> CLIP:
    """The training-time (unfolded) architecture of `config.json`, randomly initialised, in eval mode."""
    return build_model(ModelConfig.model_validate(config["model_config"])).eval()


def fold_as_exported(model: CLIP, config: dict[str, Any]) -> CLIP:
    """`model` (training-time, eval mode) folded and pruned in place as the export recorded in `config.json`."""
    if config.get("reparameterized"):
        reparameterize(model)
    drop_modules(model, config.get("dropped_modules", []))
    return model


def build_model_from_config(config: dict[str, Any]) -> CLIP:
    """The architecture described by `config.json` (folded and pruned as exported), randomly initialised."""
    return fold_as_exported(training_model(config), config)


def exported_model(model: CLIP, export_dir: str | os.PathLike, config: dict[str, Any],
                   device: str | torch.device = "cpu") -> ExportedModel:
    """`model` (folded, weights loaded) with the export's preprocessing and tokenizer."""
    return ExportedModel(model=model.to(device).eval(), preprocess=build_preprocess(config["preprocess"]),
                         context_length=int(config["tokenizer"]["context_length"]), config=config,
                         bpe=build_tokenizer(export_dir, config))


def load_exported(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild the model from `config.json` + `model.safetensors` (strict) and its preprocessing and tokenizer."""
    config = read_export_config(export_dir)
    model = build_model_from_config(config)
    load_model(model, str(Path(export_dir) / WEIGHTS_FILE), strict=True, device=str(device))
    return exported_model(model, export_dir, config, device)


class FoldedExportError(ValueError):
    """The export's weights are not those of the training-time model: folding or pruning changed its state dict."""


def training_state_dict(export_dir: str | os.PathLike, config: dict[str, Any] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The export's weights as the state dict of its training-time architecture (what training can start from),
    when folding and pruning left that architecture's state dict as it was: the weights load strictly into the
    unfolded model, and folding that model changes none of its tensors. Otherwise :class:`FoldedExportError`."""
    config = config or read_export_config(export_dir)
    model = training_model(config)
    try:  # not strict: the names that do not fit come back; a shape that does not fit raises
        missing, unexpected = load_model(model, str(Path(export_dir) / WEIGHTS_FILE), strict=False)
    except RuntimeError as err:  # "Error(s) in loading state_dict for CLIP:", then one line per problem
        raise FoldedExportError(f"weights are folded ({str(err).strip().splitlines()[-1].strip()})") from None
    if missing or unexpected:
        which = f"{sorted(missing)[0]!r} is missing" if missing else f"{sorted(unexpected)[0]!r} is not in the model"
        raise FoldedExportError(f"weights are folded or pruned ({which})")
    unfolded = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    folded = fold_as_exported(model, config).state_dict()
    changed = next((n for n in unfolded if n not in folded or not torch.equal(folded[n], unfolded[n])), None)
    if changed is not None or folded.keys() != unfolded.keys():
        raise FoldedExportError(f"weights change when the model is folded ({changed or 'new tensors'!r})")
    return unfolded
