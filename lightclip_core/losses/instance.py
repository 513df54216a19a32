"""Instance-level CLIP losses: CLIP's symmetric InfoNCE, LightCLIP's progressively softened targets and the
contrastive objective that uses them.

CLIP's loss runs over a batch of paired, L2-normalised embeddings. LightCLIP's progressive softened instance-level
alignment (arXiv 2312.00674) replaces its one-hot targets by `(1 - eps) I + eps * Q`, where Q spreads the softened
mass over the negatives either uniformly or by a stop-gradient similarity, and eps grows over training.

In a data-parallel job the rows are this rank's samples and the columns the global batch (`all_*_features`, from
`infra.distributed.gather_with_grad`; N = the global batch); row i is paired with column `offset + i`, and targets
and similarities are those rows of the global ones. The loss is the mean over this rank's rows, so the mean over
ranks is the loss of the global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightclip_core.infra.distributed import gather_no_grad, gather_with_grad, row_offset
from lightclip_core.losses.base import Objective, StepContext
from lightclip_core.losses.pairwise import HINGES, hinge_loss, sigmoid_loss


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-text logits `s * v @ U.T` and text-to-image logits `s * u @ V.T`, rows = the given features,
    columns = `all_*` (default: the same features, and the text direction is the transpose)."""
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    logits_per_image = logit_scale * image_features @ all_text.T
    if all_image is image_features and all_text is text_features:  # the whole batch: one matrix product
        return logits_per_image, logits_per_image.T
    return logits_per_image, logit_scale * text_features @ all_image.T


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
                     offset: int = 0) -> torch.Tensor:
    """`0.5 * [CE(I, softmax_rows(S)) + CE(I, softmax_rows(S.T))]` with the i-th image paired to the i-th text;
    over this rank's rows when the global batch's features are given (row i pairs with column `offset + i`)."""
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale, all_image_features,
                                                    all_text_features)
    labels = offset + torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


SCHEDULES = ("constant", "linear", "cosine")
LOSSES = ("infonce", *HINGES, "sigmoid")
KINDS = ("uniform", "similarity")


def _check_eps(value: float, name: str = "eps") -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def eps_at(step: int, total_steps: int, schedule: str, eps_start: float, eps_end: float) -> float:
    """Softening at 0-based global `step` of `total_steps`; progress = step / max(total_steps - 1, 1) in [0, 1]."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_eps(eps_start, "eps_start")
    _check_eps(eps_end, "eps_end")
    if schedule == "constant":
        return float(eps_end)
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if schedule == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return float(eps_start + (eps_end - eps_start) * progress)


def uniform_targets(n: int, eps: float, device=None, dtype: torch.dtype = torch.float32, *, rows: int | None = None,
                    offset: int = 0) -> torch.Tensor:
    """[n, n] targets with `1 - eps` on the diagonal and `eps / (n - 1)` elsewhere ([[1.0]] for n == 1); with `rows`
    only rows `offset .. offset + rows` of them, `[rows, n]` (one rank's rows of the global batch's targets)."""
    _check_eps(eps)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = n if rows is None else rows
    if rows < 0 or offset < 0 or offset + rows > n:
        raise ValueError(f"rows {offset}..{offset + rows} do not lie within the {n} targets")
    if n == 1:
        return torch.ones(rows, 1, device=device, dtype=dtype)
    targets = torch.full((rows, n), eps / (n - 1), device=device, dtype=dtype)
    positives = torch.arange(rows, device=device)
    targets[positives, positives + offset] = 1.0 - eps  # not fill_diagonal_ on a view, which torch.compile rejects
    return targets


def similarity_targets(sim: torch.Tensor, eps: float, temperature: float, *, offset: int | None = None) -> torch.Tensor:
    """`(1 - eps) I + eps * softmax_rows(sim / temperature)` with the diagonal excluded from the softmax.

    `sim` [N, N] is detached; rows of the result sum to one. For N == 1 the target is [[1.0]]. With `offset`, `sim`
    is `[b, N]`, rows `offset .. offset + b` of the global similarity, and the diagonal is at column `offset + i`.
    """
    _check_eps(eps)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if sim.dim() != 2 or (offset is None and sim.shape[0] != sim.shape[1]):
        raise ValueError(f"sim must be a square [N, N] matrix, got shape {tuple(sim.shape)}")
    offset = 0 if offset is None else offset
    if offset < 0 or offset + sim.shape[0] > sim.shape[1]:
        raise ValueError(f"sim rows {offset}..{offset + sim.shape[0]} do not lie within its {sim.shape[1]} columns")
    sim = sim.detach()
    b, n = sim.shape
    eye = torch.zeros(b, n, device=sim.device, dtype=torch.bool)
    eye[:, offset:offset + b].fill_diagonal_(True)
    if n == 1:
        return eye.to(sim.dtype)
    negatives = torch.softmax((sim / temperature).masked_fill(eye, float("-inf")), dim=1)
    return (eps * negatives).masked_fill(eye, 1.0 - eps)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                   eps: float, kind: str = "uniform", similarity: torch.Tensor | None = None,
                   temperature: float = 1.0, *, all_image_features: torch.Tensor | None = None,
                   all_text_features: torch.Tensor | None = None, offset: int = 0,
                   similarity_text: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with softened targets; eps == 0 is exactly CLIP's loss.

    kind "similarity" spreads eps by `similarity` [N, N] (rows = images, detached; the text direction uses its
    transpose), defaulting to the detached student logits `s * v @ u.T`, divided by `temperature`.

    Data-parallel form: the given features are this rank's rows, `all_*_features` the global batch's (columns),
    row i's positive is column `offset + i`, and the loss is the mean over these rows. A given similarity is then
    `[b, N]` for the image rows, with `similarity_text` `[b, N]` for the text rows (the rows of its transpose).
    """
    _check_eps(eps)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale, all_image_features,
                                                    all_text_features)
    b, n = logits_per_image.shape
    if eps == 0:
        labels = offset + torch.arange(b, device=logits_per_image.device)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    square = offset == 0 and b == n
    if kind == "uniform":
        targets_image = targets_text = uniform_targets(n, eps, logits_per_image.device, logits_per_image.dtype,
                                                       rows=b, offset=offset)
    else:
        if similarity is None:
            sim_image, sim_text = logits_per_image, logits_per_text
        else:
            if similarity_text is None and not square:
                raise ValueError("similarity for a rank's rows of a larger batch needs similarity_text as well")
            sim_image, sim_text = similarity, similarity.T if similarity_text is None else similarity_text
        for name, sim in (("similarity", sim_image), ("similarity_text", sim_text)):
            if sim.shape != logits_per_image.shape:
                raise ValueError(f"{name} must have shape {tuple(logits_per_image.shape)}, got {tuple(sim.shape)}")
        rows = None if square else offset
        targets_image = similarity_targets(sim_image.detach().to(logits_per_image), eps, temperature, offset=rows)
        targets_text = similarity_targets(sim_text.detach().to(logits_per_image), eps, temperature, offset=rows)
    return 0.5 * (_soft_cross_entropy(logits_per_image, targets_image)
                  + _soft_cross_entropy(logits_per_text, targets_text))


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
    model's own detached logits, or an EMA copy of the model (ALBEF's momentum distillation). `loss` replaces
    InfoNCE by VSE++'s hinges or SigLIP's sigmoid loss (losses/pairwise.py), which take no soft targets.

    Data parallel: this rank's rows against the global batch's columns (features gathered with gradients, EMA
    features without); the loss is the mean over this rank's rows, so the mean over ranks is the global loss."""

    name = "contrastive"

    def __init__(self, soft_targets: str = "none", eps_schedule: str = "constant", eps_start: float = 0.0,
                 eps_end: float = 0.0, temperature: float = 1.0, ema_of: nn.Module | None = None,
                 ema_momentum: float = 0.995, weight: float = 1.0, loss: str = "infonce", margin: float = 0.2):
        super().__init__(weight)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss != "infonce" and soft_targets != "none":
            raise ValueError(f"soft targets soften InfoNCE only, not loss {loss!r}")
        self.loss, self.margin = loss, float(margin)
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
        if self.loss == "sigmoid":  # every pair counts once: this rank's images against every text
            if "logit_bias" not in outputs:
                raise ValueError("the sigmoid loss needs a model with a logit bias (model.init_logit_bias)")
            loss = sigmoid_loss(image, text, scale, outputs["logit_bias"], all_text_features=gather_with_grad(text),
                                offset=row_offset(image.shape[0]))
            return {"contrastive_loss": loss, "logit_bias": outputs["logit_bias"].detach()}
        columns = {"all_image_features": gather_with_grad(image), "all_text_features": gather_with_grad(text),
                   "offset": row_offset(image.shape[0])}
        if self.loss in HINGES:
            return {"contrastive_loss": hinge_loss(image, text, self.margin, self.loss, **columns)}
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
