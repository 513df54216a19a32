"""The CLIP model: an image tower and a text tower meeting in a joint space, with a learnable temperature."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightclip_core.models.config import ModelConfig
from lightclip_core.models.image_tower import ImageTower
from lightclip_core.models.text_tower import build_text_tower
from lightclip_core.models.tokenizer import special_token_ids, vocab_size


class CLIP(nn.Module):
    """`encode_image` / `encode_text` give L2-normalised embeddings; `forward` also returns the logit scale
    `exp(logit_scale)`, clamped at `max_logit_scale` (100 in CLIP), and the sigmoid loss's `logit_bias` if it has
    one."""

    def __init__(self, cfg: ModelConfig, pretrained_image: bool = False):
        super().__init__()
        self.cfg = cfg
        self.visual = ImageTower(cfg.image.tower, cfg.embed_dim, pretrained=pretrained_image,
                                 output_stride=cfg.image.output_stride)
        self.text = build_text_tower(cfg.text, cfg.embed_dim, vocab_size(), special_token_ids()["eot"])
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.max_logit_scale = float(cfg.max_logit_scale)
        # the sigmoid loss's bias (open_clip's `logit_bias`): only a model trained with that loss has one
        bias = cfg.init_logit_bias
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.visual(images)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.text(tokens)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, image_strides: tuple[int, ...] = (),
                text_hidden: bool = False) -> dict[str, Any]:
        """Embeddings and scale; with `image_strides` also `image_maps` {stride: [B, C, H, W]}, with `text_hidden`
        also `text_hidden` [B, L, width] (the final hidden states), for the training-only objectives."""
        out: dict[str, Any] = {}
        if image_strides:
            image, out["image_maps"] = self.visual.forward_maps(images, image_strides)
        else:
            image = self.visual(images)
        if text_hidden:
            text, out["text_hidden"] = self.text.forward_tokens(tokens)
        else:
            text = self.text(tokens)
        out.update(image_features=F.normalize(image, dim=-1), text_features=F.normalize(text, dim=-1),
                   logit_scale=self.scale())
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def ignores_padding(self) -> bool:
        """Padding after end-of-text never reaches the embedding (see TextTower), so batches may be trimmed."""
        return True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them (timm's contract): the image trunk
        through timm's own switch, the text transformer through open_clip's `grad_checkpointing` flag, which
        the text tower's block loop reads."""
        self.visual.trunk.set_grad_checkpointing(enable)
        self.text.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: biases, norms, embeddings and the temperature."""
        return {n for n, p in self.named_parameters()
                if p.ndim < 2 or "embedding" in n or n in ("logit_scale", "logit_bias")}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The student `cfg` describes, randomly initialised: this project's CLIP, or an open_clip architecture
    (`model.open_clip`, lightclip_core/models/open_clip_student.py) with the same interface."""
    if cfg.open_clip is not None:
        from lightclip_core.models.open_clip_student import OpenClipStudent

        return OpenClipStudent(cfg)
    return CLIP(cfg)


def model_summary(model: nn.Module) -> dict[str, Any]:
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return {"params_total": count(model), "params_image": count(model.visual), "params_text": count(model.text)}


@torch.inference_mode()
def zero_shot_weights(model: CLIP, classnames: Sequence[str], templates: Sequence[str],
                      tokenize: Callable[[list[str]], torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """`[D, C]` classifier: per class, the mean of its normalised template embeddings, renormalised."""
    if not classnames or not templates:
        raise ValueError(f"zero-shot needs classes and templates, got {len(classnames)} and {len(templates)}")
    prompts = [template.format(name) for name in classnames for template in templates]
    device = next(model.parameters()).device
    chunks = [model.encode_text(tokenize(prompts[i:i + batch_size]).to(device), normalize=True)
              for i in range(0, len(prompts), batch_size)]
    per_template = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1).T.contiguous()
