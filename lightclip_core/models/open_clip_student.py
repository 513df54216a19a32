"""An open_clip model as the student: open_clip's own `CustomTextCLIP`, with the interface this project's training
objectives, export and evaluation use (that of `lightclip_core.models.clip.CLIP`).

The student holds open_clip's `visual` and `text` modules themselves, so its state dict is open_clip's and open_clip
loads it back (`open_clip.create_model("local-dir:<export>")`). The two towers keep their classes and `forward`;
each gets, through a subclass made at build time, the methods the training-only objectives call:
- the image tower: `forward_maps(images, strides)` (the pooled embedding and stage maps in one pass, through
  open_clip's `forward_intermediates`), `stage_index`, `stage_channels`;
- the text tower: `forward_tokens(tokens, replace=, after_layer=, causal=)` (the pooled embedding and the final hidden
  states, with MLM's masked-token replacement and fusion hook) and `eot_positions`, following open_clip's own text
  forward step by step (its embedding, masks, blocks, final norm, pooling and projection).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from open_clip.transformer import text_global_pool
from torch import nn

from lightclip_core.models.config import ModelConfig
from lightclip_core.models.open_clip_arch import (CONFIG_FILE, HF_HUB, LOCAL_DIR, WEIGHTS_FILES, local_dir_weights,
                                                  register_towers)


class ImageMaps:
    """Stage maps of an open_clip image tower: a timm trunk's `feature_info`, or a ViT's blocks (all at its patch
    stride; the last block's map is taken)."""

    def stage_strides(self) -> list[tuple[int, int, int]]:
        """(intermediate index, stride, channels) of every stage `forward_intermediates` can return."""
        trunk = getattr(self, "trunk", None)
        if trunk is not None and hasattr(trunk, "feature_info"):
            info = trunk.feature_info
            return [(i, int(stage["reduction"]), int(stage["num_chs"])) for i, stage in enumerate(info)]
        transformer, patch = getattr(self, "transformer", None), getattr(self, "patch_size", None)
        if transformer is None or patch is None:
            raise ValueError(f"the open_clip image tower {type(self).__name__} exposes no stage maps")
        stride = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        return [(i, stride, int(transformer.width)) for i in range(len(transformer.resblocks))]

    def stage_index(self, stride: int) -> int:
        found = [i for i, s, _ in self.stage_strides() if s == stride]
        if not found:
            raise ValueError(f"the open_clip image tower has no stage at stride {stride}; it has "
                             f"{sorted({s for _, s, _ in self.stage_strides()})}")
        return found[-1]

    def stage_channels(self, stride: int) -> int:
        index = self.stage_index(stride)
        return next(c for i, _, c in self.stage_strides() if i == index)

    def forward_maps(self, images: torch.Tensor, strides: tuple[int, ...]
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(embedding, {stride: stage map [B, C, H, W]}) in one pass of the tower."""
        indices = sorted({self.stage_index(s) for s in strides})
        out = self.forward_intermediates(images, indices=indices, output_fmt="NCHW")
        by_index = dict(zip(indices, out["image_intermediates"]))
        return out["image_features"], {s: by_index[self.stage_index(s)] for s in strides}


class TextTokens:
    """Token-level passes of an open_clip `TextTransformer`, equal to its `forward` when no keyword is given."""

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled position of each sequence, by the tower's own pooling."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def token_mask(self, tokens: torch.Tensor, causal: bool) -> torch.Tensor | None:
        """open_clip's attention mask: causal, causal plus padding, padding only, or none (a bidirectional tower
        without `use_pad_mask` attends to its padding). A causal tower made bidirectional (`causal=False`, MLM's
        pass) masks its padding by position."""
        n = tokens.shape[1]
        dtype = self.positional_embedding.dtype
        if causal and self.attn_mask is not None:
            mask = self.attn_mask[:n, :n]
            if self.use_pad_mask:
                mask = mask.unsqueeze(0) + self._build_additive_mask(tokens, n, dtype)
            return mask
        if self.use_pad_mask:
            return self._build_additive_mask(tokens, n, dtype)
        if self.attn_mask is None:
            return None
        real = torch.arange(n, device=tokens.device) <= self.eot_positions(tokens)[:, None]
        blocked = torch.zeros(real.shape, dtype=dtype, device=tokens.device).masked_fill(~real, float("-inf"))
        return blocked[:, None, None, :].expand(-1, self.heads, n, -1).reshape(-1, n, n)

    def forward_tokens(self, tokens: torch.Tensor, *, replace: tuple[torch.Tensor, torch.Tensor] | None = None,
                       after_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                       causal: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding, final hidden states `[B, L, width]`); see TextTower.forward_tokens for the keywords."""
        causal = (self.attn_mask is not None) if causal is None else causal
        if replace is None:
            x = self.token_embedding(tokens)
        else:  # sparse: a second pass spares a second dense [vocab, width] gradient buffer
            x = F.embedding(tokens, self.token_embedding.weight, sparse=True)
            where, row = replace
            x = torch.where(where[..., None], row.to(x.dtype), x)
        x = x + self.positional_embedding[:tokens.shape[1]].to(x.dtype)
        mask = self.token_mask(tokens, causal)
        checkpointed = self.training and self.transformer.grad_checkpointing
        for i, block in enumerate(self.transformer.resblocks):
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            if after_layer is not None:
                x = after_layer(i, x)
        x = self.ln_final(x)
        pooled = text_global_pool(x, tokens, pool_type=self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return pooled, x


_ADAPTED: dict[tuple[type, type], type] = {}


def adapt(module: nn.Module, mixin: type) -> nn.Module:
    """`module` with `mixin`'s methods: its class becomes a subclass of (mixin, its class), made once per class.
    Its parameters, buffers, names and `forward` are untouched."""
    cls = type(module)
    key = (mixin, cls)
    if key not in _ADAPTED:
        _ADAPTED[key] = type(f"{cls.__name__}With{mixin.__name__}", (mixin, cls), {})
    module.__class__ = _ADAPTED[key]
    return module


class _NoWeightsNotice(logging.Filter):
    """open_clip's factory warns that a config-only local-dir holds no weights: here that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and "open_clip" in record.pathname)


def create_open_clip(model_cfg: dict[str, Any], preprocess: dict[str, Any] | None = None,
                     **model_kwargs: Any) -> nn.Module:
    """A randomly initialised open_clip model of `model_cfg`, through open_clip's own factory (a local-dir holding
    only the config)."""
    register_towers(model_cfg)
    quiet, root = _NoWeightsNotice(), logging.getLogger()
    root.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="open_clip_cfg-") as tmp:
            config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config))
            return open_clip.create_model(f"local-dir:{tmp}", load_weights=False, **model_kwargs)
    finally:
        root.removeFilter(quiet)


class OpenClipStudent(nn.Module):
    """open_clip's CustomTextCLIP with CLIP's interface here: `encode_image` / `encode_text` (normalised by default),
    `scale()` (exp(logit_scale) clamped at `max_logit_scale`), `forward(images, tokens, image_strides, text_hidden)`,
    `no_weight_decay`, `set_grad_checkpointing`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.open_clip is None or cfg.open_clip.model_cfg is None:
            raise ValueError("an open_clip student needs model.open_clip with its model_cfg")
        self.cfg = cfg
        kwargs: dict[str, Any] = {"init_logit_scale": float(cfg.init_logit_scale)}
        if cfg.init_logit_bias is not None:
            kwargs["init_logit_bias"] = float(cfg.init_logit_bias)
        oc = create_open_clip(cfg.open_clip.model_cfg, preprocess_cfg(cfg), **kwargs)
        self.visual = adapt(oc.visual, ImageMaps)
        self.text = adapt(oc.text, TextTokens)
        self.logit_scale = oc.logit_scale
        self.logit_bias = oc.logit_bias
        self.max_logit_scale = float(cfg.max_logit_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale).reshape(())

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.visual(images)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """open_clip's text forward, through `forward_tokens` (equal to it), which also takes batches trimmed of
        padding: open_clip's own causal mask is for the full context only."""
        emb = self.text.forward_tokens(tokens)[0]
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, image_strides: tuple[int, ...] = (),
                text_hidden: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if image_strides:
            image, out["image_maps"] = self.visual.forward_maps(images, image_strides)
        else:
            image = self.visual(images)
        text, hidden = self.text.forward_tokens(tokens)
        if text_hidden:
            out["text_hidden"] = hidden
        out.update(image_features=F.normalize(image, dim=-1), text_features=F.normalize(text, dim=-1),
                   logit_scale=self.scale())
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.reshape(())
        return out

    def ignores_padding(self) -> bool:
        """Whether padding after end-of-text leaves the text embedding as it is (so batches may be trimmed): a causal
        tower, or one that masks its padding. MobileCLIP's bidirectional text towers attend to it."""
        return self.text.attn_mask is not None or bool(self.text.use_pad_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters()
                if p.ndim < 2 or "embedding" in n or "cls_emb" in n or n in ("logit_scale", "logit_bias")}


def preprocess_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` of the student's `model.image` (what training and evaluation feed it)."""
    return {"size": cfg.image.size, "mean": list(cfg.image.mean), "std": list(cfg.image.std),
            "interpolation": cfg.image.interpolation, "resize_mode": "shortest"}


def write_open_clip_dir(cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: Path) -> dict[str, Path]:
    """For an open_clip student, make `out_dir` an open_clip local-dir: `open_clip_config.json` and
    `open_clip_model.safetensors` (`state`, the training-time weights before folding), so that
    `open_clip.create_model("local-dir:<out_dir>")` loads the model and another run can start from it. {} for this
    project's own model."""
    from safetensors.torch import save_file

    from lightclip_core.infra.storage import atomic_path, write_json_atomic

    if cfg.open_clip is None:
        return {}
    files = {"open_clip_weights": out_dir / WEIGHTS_FILES[0], "open_clip_config": out_dir / CONFIG_FILE}
    with atomic_path(files["open_clip_weights"]) as tmp:
        save_file({name: tensor.cpu().contiguous() for name, tensor in state.items()}, str(tmp))
    write_json_atomic(files["open_clip_config"], {"model_cfg": cfg.open_clip.model_cfg,
                                                  "preprocess_cfg": preprocess_cfg(cfg)})
    return files


def load_open_clip_weights(student: OpenClipStudent, path: str) -> None:
    """open_clip's checkpoint loader (which converts the top-level text layout and other known formats) into the
    student."""
    open_clip.load_checkpoint(student, path, strict=True, weights_only=True)


def pretrained_file(model: str, pretrained: str | None) -> str | None:
    """The weights file the open_clip student starts from: a checkpoint path, a tag's file (downloaded by open_clip
    into its cache; offline only what is there), a local-dir's own file; None for a random start."""
    if pretrained is None and model.startswith(HF_HUB):
        from open_clip.factory import download_pretrained_from_hf

        return download_pretrained_from_hf(model[len(HF_HUB):])
    if pretrained is None:
        found = local_dir_weights(model)
        return None if found is None else str(found)
    if Path(pretrained).is_file() or model.startswith(LOCAL_DIR):
        return pretrained
    tag = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag:
        raise ValueError(f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {model} (tags: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})")
    return open_clip.download_pretrained(tag)

