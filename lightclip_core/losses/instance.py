"""The instance-level objective: CLIP's loss, with LightCLIP's progressively softened targets as an option."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightclip_core.losses.base import Objective, StepContext
from lightclip_core.losses.contrastive import contrastive_loss
from lightclip_core.losses.gather import gather_no_grad, gather_with_grad, row_offset
from lightclip_core.losses.soft_targets import eps_at, soft_clip_loss


def _ema_update(momentum: float):
    """`ema = m * ema + (1 - m) * model` as multiply-add, for AveragedModel. torch's own EMA uses lerp, which turns a
    constant -inf entry (the text tower's causal-mask buffer) into NaN; integer buffers follow the model."""

    def update(ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor], _: torch.Tensor) -> None:
        for ema, current in zip(ema_tensors, model_tensors):
            if ema.is_floating_point():
                ema.mul_(momentum).add_(current, alpha=1.0 - momentum)
            else:
                ema.copy_(current)

    return update


class ContrastiveObjective(Objective):
    """The instance level: CLIP's loss, or LightCLIP's progressively softened targets (`soft_targets` uniform or
    similarity, eps from a schedule over the global step, logged as `soft_eps`). The similarity source is the
    model's own detached logits, or an EMA copy of the model (ALBEF's momentum distillation).

    Data parallel: this rank's rows against the global batch's columns (features gathered with gradients, EMA
    features without); the loss is the mean over this rank's rows, so the mean over ranks is the global loss."""

    name = "contrastive"

    def __init__(self, soft_targets: str = "none", eps_schedule: str = "constant", eps_start: float = 0.0,
                 eps_end: float = 0.0, temperature: float = 1.0, ema_of: nn.Module | None = None,
                 ema_momentum: float = 0.995, weight: float = 1.0):
        super().__init__(weight)
        self.soft_targets, self.eps_schedule = soft_targets, eps_schedule
        self.eps_start, self.eps_end, self.temperature = eps_start, eps_end, temperature
        self.ema = None
        if ema_of is not None:
            self.ema = AveragedModel(ema_of, multi_avg_fn=_ema_update(ema_momentum), use_buffers=True)
            self.ema.n_averaged.fill_(1)  # the copy made here is the EMA's start: average from the first update on
            self.ema.requires_grad_(False)

    def forward(self, outputs: dict[str, torch.Tensor],
                ctx: StepContext | None = None) -> dict[str, torch.Tensor | float]:
        image, text, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
        columns = {"all_image_features": gather_with_grad(image), "all_text_features": gather_with_grad(text),
                   "offset": row_offset(image.shape[0])}
        if self.soft_targets == "none":
            return {"contrastive_loss": contrastive_loss(image, text, scale, **columns)}
        if ctx is None:
            raise ValueError("softened targets follow the global step: pass a StepContext")
        eps = eps_at(ctx.step, ctx.total_steps, self.eps_schedule, self.eps_start, self.eps_end)
        sim_image, sim_text = self._ema_similarity(ctx) if self.ema is not None else (None, None)
        loss = soft_clip_loss(image, text, scale, eps, kind=self.soft_targets, similarity=sim_image,
                              similarity_text=sim_text, temperature=self.temperature, **columns)
        return {"contrastive_loss": loss, "soft_eps": eps}

    def _ema_similarity(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA model's logits for this rank's rows against the global batch: (image rows, text rows), `[b, N]`."""
        self.ema.eval()
        with torch.no_grad():
            out = self.ema.module(ctx.images, ctx.tokens)
            image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
            all_image, all_text = gather_no_grad(image), gather_no_grad(text)
            sim_image = scale * image @ all_text.T
            if all_text.shape[0] == image.shape[0]:  # a job of one: the text rows are the transpose
                return sim_image, sim_image.T
            return sim_image, scale * text @ all_image.T

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update_parameters(model)
