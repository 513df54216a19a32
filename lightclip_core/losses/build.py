"""The objectives that `params.yaml`'s `objectives` section asks for, built against the model they train."""
from __future__ import annotations

from typing import Any

from torch import nn

from lightclip_core.config import Config, ConfigError
from lightclip_core.data.tokenizer import vocab_size
from lightclip_core.losses.distill import DistillationObjective
from lightclip_core.losses.instance import ContrastiveObjective
from lightclip_core.losses.mlm import MaskedLanguageObjective
from lightclip_core.losses.token import TokenAlignmentObjective


def _stage_channels(model: nn.Module, stride: int, field: str) -> int:
    try:
        return model.visual.stage_channels(stride)
    except ValueError as err:
        raise ConfigError(f"{field}={stride}: {err}") from None


def build_objectives(cfg: Config, model: nn.Module, reinforcement: dict[str, Any] | None = None) -> nn.ModuleList:
    """One module per enabled objective, in the order contrastive, token, mlm, distill. A stride the image tower
    does not have, or a fusion layer past the text tower's depth, raises ConfigError naming the field. Distillation
    takes the teachers' embedding widths and scales from the reinforced split's manifest (`reinforcement`)."""
    o, text = cfg.objectives, cfg.model.text
    objectives: list[nn.Module] = []
    if o.contrastive.enabled:
        c = o.contrastive
        ema_of = model if c.soft_targets == "similarity" and c.similarity_source == "ema" else None
        objectives.append(ContrastiveObjective(
            c.soft_targets, c.eps_schedule, c.eps_start, c.eps_end, c.similarity_temperature, ema_of=ema_of,
            ema_momentum=c.ema_momentum, weight=c.weight))
    if o.token.enabled:
        t = o.token
        channels = _stage_channels(model, t.image_stride, "objectives.token.image_stride")
        objectives.append(TokenAlignmentObjective(
            channels, text.width, cfg.model.embed_dim, t.image_stride, t.matcher, t.threshold, t.patches_per_word,
            t.loss, t.temperature, weight=t.weight))
    if o.mlm.enabled:
        m = o.mlm
        fusion = []
        for i, point in enumerate(m.fusion):
            if point.text_layer >= text.layers:
                raise ConfigError(f"objectives.mlm.fusion[{i}].text_layer={point.text_layer}: the text tower has "
                                  f"{text.layers} layers (0..{text.layers - 1})")
            channels = _stage_channels(model, point.image_stride, f"objectives.mlm.fusion[{i}].image_stride")
            fusion.append((point.text_layer, point.image_stride, channels))
        objectives.append(MaskedLanguageObjective(text.width, text.heads, vocab_size(), fusion, m.mask_prob,
                                                  m.causal, m.batch_fraction, weight=m.weight,
                                                  seed=cfg.train.seed))
    if o.distill.enabled:
        d = o.distill
        if reinforcement is None:
            raise ConfigError("objectives.distill.enabled=true: the training split is not reinforced; run "
                              "`lightclip reinforce` or set objectives.distill.enabled=false")
        scales = d.teacher_scales or reinforcement["scales"]
        if len(scales) != len(reinforcement["dims"]):
            raise ConfigError(f"objectives.distill.teacher_scales={d.teacher_scales}: the reinforced split has "
                              f"{len(reinforcement['dims'])} teachers")
        objectives.append(DistillationObjective(reinforcement["dims"], scales, d.lam, d.caption_batches,
                                                weight=d.weight))
    return nn.ModuleList(objectives)


def forward_needs(objectives: nn.ModuleList) -> dict[str, object]:
    """The keywords of `CLIP.forward` that the objectives need (image stage maps, text hidden states)."""
    strides = sorted({s for obj in objectives for s in obj.image_strides})
    return {"image_strides": tuple(strides), "text_hidden": any(obj.needs_text_hidden for obj in objectives)}
