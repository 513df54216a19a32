"""The objectives that `params.yaml`'s `objectives` section asks for, built against the model they train, and the
model and its objectives as one module: what a training step differentiates, and what DDP wraps.

Holding both as submodules lets DistributedDataParallel synchronise the objectives' own parameters (projections,
fusion blocks, heads) together with the model's. Under data parallelism each objective returns this rank's share
of every term (infra/distributed.py): the mean over ranks of the returned total, and of every term, is the
single-process value on the global batch, and DDP's gradient average makes the gradients exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightclip_core.config import Config, ConfigError, DistillObjectiveConfig
from lightclip_core.infra.distributed import global_mean
from lightclip_core.losses.base import StepContext
from lightclip_core.losses.distill import DistillationObjective
from lightclip_core.losses.fusion import FusionBlocks
from lightclip_core.losses.instance import ContrastiveObjective
from lightclip_core.losses.itm import ImageTextMatchingObjective
from lightclip_core.losses.mlm import MaskedLanguageObjective
from lightclip_core.losses.token import TokenAlignmentObjective
from lightclip_core.models.tokenizer import vocab_size


def _stage_channels(model: nn.Module, stride: int, field: str) -> int:
    try:
        return model.visual.stage_channels(stride)
    except ValueError as err:
        raise ConfigError(f"{field}={stride}: {err}") from None


def _fusion(cfg: Config, model: nn.Module) -> FusionBlocks:
    """The fused pass of `objectives.mlm.fusion`, which MLM and ITM share. A fusion layer past the text tower's depth
    or a stride the image tower does not have raises ConfigError naming the field."""
    text, points = cfg.model.text, []
    for i, point in enumerate(cfg.objectives.mlm.fusion):
        if point.text_layer >= text.layers:
            raise ConfigError(f"objectives.mlm.fusion[{i}].text_layer={point.text_layer}: the text tower has "
                              f"{text.layers} layers (0..{text.layers - 1})")
        channels = _stage_channels(model, point.image_stride, f"objectives.mlm.fusion[{i}].image_stride")
        points.append((point.text_layer, point.image_stride, channels))
    return FusionBlocks(text.width, text.heads, points, causal=cfg.objectives.mlm.causal,
                        init_std=cfg.objectives.mlm.fusion_init_std)


def build_objectives(cfg: Config, model: nn.Module, reinforcement: dict[str, Any] | None = None) -> nn.ModuleList:
    """One module per enabled objective, in the order contrastive, token, mlm, itm, distill (mlm and itm share one
    fusion module). With distillation on, the contrastive objective is not a term of its own but CLIP's part of the
    distillation loss, `(1 - lam) * CLIP + lam * KD` per caption batch (issue #16: one instance-level term). A stride
    the image tower does not have, or a fusion layer past the text tower's depth, raises ConfigError naming the field.
    Distillation takes the teachers' embedding widths and scales from the reinforced split's manifest
    (`reinforcement`)."""
    o, text = cfg.objectives, cfg.model.text
    objectives: list[nn.Module] = []
    contrastive = None
    if o.contrastive.enabled:
        c = o.contrastive
        ema_of = model if c.soft_targets == "similarity" and c.similarity_source == "ema" else None
        contrastive = ContrastiveObjective(
            c.soft_targets, c.eps_schedule, c.eps_start, c.eps_end, c.similarity_temperature, ema_of=ema_of,
            ema_momentum=c.ema_momentum, weight=c.weight, loss=c.loss, margin=c.margin)
    if contrastive is not None and not o.distill.enabled:  # with distillation on, it is CLIP's part of that loss
        objectives.append(contrastive)
    if o.token.enabled:
        t = o.token
        channels = _stage_channels(model, t.image_stride, "objectives.token.image_stride")
        objectives.append(TokenAlignmentObjective(
            channels, text.width, cfg.model.embed_dim, t.image_stride, t.matcher, t.threshold, t.patches_per_word,
            t.loss, t.temperature, weight=t.weight))
    fusion = _fusion(cfg, model) if o.mlm.enabled or o.itm.enabled else None
    if o.mlm.enabled:
        m = o.mlm
        objectives.append(MaskedLanguageObjective(text.width, vocab_size(), fusion, m.mask_prob, m.batch_fraction,
                                                  weight=m.weight, seed=cfg.train.seed))
    if o.itm.enabled:
        objectives.append(ImageTextMatchingObjective(text.width, fusion, o.itm.negatives, weight=o.itm.weight,
                                                     seed=cfg.train.seed))
    if o.distill.enabled:
        d = o.distill
        if reinforcement is None:
            raise ConfigError("objectives.distill.enabled=true: the training split is not reinforced; run "
                              "`lightclip reinforce` or set objectives.distill.enabled=false")
        objectives.append(DistillationObjective(reinforcement["dims"], teacher_scales(d, reinforcement), d.lam,
                                                d.caption_batches,
                                                weight=d.weight, feature_weight=d.feature_weight,
                                                embed_dim=cfg.model.embed_dim, clip=contrastive))
    return nn.ModuleList(objectives)


def teacher_scales(d: DistillObjectiveConfig, reinforcement: dict[str, Any]) -> list[float]:
    """The fixed scale of each teacher the distillation targets use: `d.teacher_scales` (one for all, or one per
    teacher), else the reinforced split's manifest's."""
    teachers = len(reinforcement["dims"])
    scales = list(reinforcement["scales"] if d.teacher_scales is None else d.teacher_scales)
    if d.teacher_scales is not None and len(scales) == 1:
        scales = scales * teachers  # one fixed scale for every teacher, as MobileCLIP's 100
    if len(scales) != teachers:
        raise ConfigError(f"objectives.distill.teacher_scales={d.teacher_scales}: the reinforced split has "
                          f"{teachers} teachers (give one scale for all, or one per teacher)")
    return [float(x) for x in scales]


def forward_needs(objectives: nn.ModuleList) -> dict[str, object]:
    """The keywords of `CLIP.forward` that the objectives need (image stage maps, text hidden states)."""
    strides = sorted({s for obj in objectives for s in obj.image_strides})
    return {"image_strides": tuple(strides), "text_hidden": any(obj.needs_text_hidden for obj in objectives)}


class TrainingLoss(nn.Module):
    """`forward(images, tokens, step, total_steps, extras)` -> (total loss, terms, model outputs).

    The total is the sum of every objective's `*_loss` terms times its weight: this rank's share, to backpropagate.
    `terms` holds every objective term and `loss` (the total) as floats with their global values, the mean over
    ranks of the local ones (one all-reduce per step; no collective in a job of one).
    """

    def __init__(self, model: nn.Module, objectives: nn.ModuleList):
        super().__init__()
        self.model = model
        self.objectives = objectives

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, step: int, total_steps: int,
                extras: dict[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[str, float], dict[str, Any]]:
        outputs = self.model(images, tokens, **forward_needs(self.objectives))
        ctx = StepContext(step=step, total_steps=total_steps, images=images, tokens=tokens, model=self.model,
                          extras=extras or {})
        total = images.new_zeros(())
        local: dict[str, torch.Tensor | float] = {}
        for objective in self.objectives:
            named = objective(outputs, ctx)
            total = total + objective.weight * sum(v for k, v in named.items() if k.endswith("_loss"))
            local.update(named)
        return total, global_terms({"loss": total, **local}), outputs

    def after_step(self) -> None:
        """Call after every optimizer step (an EMA copy follows the model)."""
        for objective in self.objectives:
            objective.after_step(self.model)


def global_terms(terms: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Every term as a float: the mean over ranks of this rank's values, in one all-reduce and one host copy. Every
    rank must pass the same names in the same order."""
    if not terms:
        return {}
    device = next((v.device for v in terms.values() if torch.is_tensor(v)), None)
    values = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                          else torch.tensor(float(v), dtype=torch.float64, device=device) for v in terms.values()])
    return dict(zip(terms, global_mean(values).tolist()))
