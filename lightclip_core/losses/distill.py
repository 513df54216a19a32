"""MobileCLIP's multi-modal reinforced training loss (Vasu et al., arXiv 2311.17049), as an objective.

For a batch B of b samples (student features v, u normalised, learnable scale s; K teachers with fixed scales s_k):

    S    = s * v @ u.T
    P    = mean_k softmax_rows(s_k * T_img[k] @ T_txt[k].T)      (probabilities averaged, not logits)
    P'   = mean_k softmax_rows(s_k * T_txt[k] @ T_img[k].T)
    KD   = 0.5 * [CE(P, softmax_rows(S)) + CE(P', softmax_rows(S.T))],  CE(P, Q) = mean_i -sum_j P_ij log Q_ij
    L(B) = (1 - lam) * CLIP(B) + lam * KD(B)
    loss = L(B_real) + L(B_syn)      (same image features; ground-truth captions, then one synthetic caption each)

This is the whole instance-level objective when distillation is on (issue #16): CLIP(B) is the contrastive
objective's loss on the caption batch B (`objectives.contrastive`: LightCLIP's softened targets when they are on, or
a hinge or SigLIP's sigmoid), CLIP's InfoNCE without one; there is no second, separate contrastive term beside it.

Optionally (`feature_weight` > 0), L2 feature distillation (Popp et al., arXiv 2404.16637): each student embedding
is mapped by a training-only linear projection W_k per teacher and pulled towards that teacher's stored embedding,

    F(x, T) = mean_k mean_i || normalise(W_k x_i) - normalise(T[k]_i) ||^2
    loss   += feature_weight * [F(v, T_img) + F(u_real, T_txt) + F(u_syn, T_syn)]   (the caption batches in use)

a per-sample target (the teacher's embedding itself) rather than a distribution over the batch.

Teacher embeddings are the K teachers' normalised embeddings side by side, `[b, sum(dims)]` (stored as fp16): each
slice is re-normalised in float32 and the teacher probabilities carry no gradient.

Data parallel: a rank computes its own rows of S, P and P' against the global batch's columns (student features
gathered with gradients, teacher embeddings without); every cross-entropy is a mean over this rank's rows, so the
mean over ranks is the loss of the global batch.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightclip_core.infra.distributed import gather_no_grad, gather_with_grad, row_offset
from lightclip_core.losses.base import Objective, StepContext
from lightclip_core.losses.instance import ContrastiveObjective, clip_logits, contrastive_loss
from lightclip_core.models.tokenizer import trim_padding

CAPTION_BATCHES = ("both", "real", "synthetic")


def teacher_probabilities(teacher_image: torch.Tensor, teacher_text: torch.Tensor, dims: Sequence[int],
                          scales: Sequence[float], all_teacher_image: torch.Tensor | None = None,
                          all_teacher_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P image->text, P' text->image), both `[b, b]` float32: the K teachers' row softmaxes, averaged. With the
    global batch's teacher embeddings (`all_*`, `[N, sum(dims)]`), this rank's rows against them, `[b, N]`."""
    dims, scales = list(dims), list(scales)
    if len(dims) != len(scales):
        raise ValueError(f"{len(dims)} teacher dims {dims} but {len(scales)} teacher scales {scales}")
    for name, emb in (("image", teacher_image), ("text", teacher_text)):
        if emb.ndim != 2 or emb.shape[1] != sum(dims):
            raise ValueError(f"teacher {name} embedding width {emb.shape[-1]} != sum of the manifest's teacher dims "
                             f"{dims} = {sum(dims)}")
    if teacher_image.shape != teacher_text.shape:
        raise ValueError(f"teacher image embeddings {tuple(teacher_image.shape)} and text embeddings "
                         f"{tuple(teacher_text.shape)} differ in shape")
    whole = ((all_teacher_image is None or all_teacher_image is teacher_image)
             and (all_teacher_text is None or all_teacher_text is teacher_text))
    all_image = teacher_image if all_teacher_image is None else all_teacher_image
    all_text = teacher_text if all_teacher_text is None else all_teacher_text
    with torch.no_grad():
        p_img = p_txt = torch.zeros(teacher_image.shape[0], all_image.shape[0], device=teacher_image.device)
        for img, txt, all_img, all_txt, scale in zip(*(t.float().split(dims, 1) for t in
                                                       (teacher_image, teacher_text, all_image, all_text)), scales):
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            logits = scale * img @ (txt if whole else F.normalize(all_txt, dim=-1)).T
            logits_text = logits.T if whole else scale * txt @ F.normalize(all_img, dim=-1).T
            p_img, p_txt = p_img + logits.softmax(dim=1), p_txt + logits_text.softmax(dim=1)
        return p_img / len(dims), p_txt / len(dims)


def _soft_ce(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32, float64 stays
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def distillation_kd(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    teacher_image: torch.Tensor, teacher_text: torch.Tensor, dims: Sequence[int],
                    scales: Sequence[float], *, all_image_features: torch.Tensor | None = None,
                    all_text_features: torch.Tensor | None = None, all_teacher_image: torch.Tensor | None = None,
                    all_teacher_text: torch.Tensor | None = None) -> torch.Tensor:
    """KD: cross-entropy of the student's row softmaxes against the averaged teacher probabilities, both ways;
    with the global batch's features and teacher embeddings (`all_*`), over this rank's rows."""
    if teacher_image.shape[0] != image_features.shape[0]:
        raise ValueError(f"teacher batch {teacher_image.shape[0]} != student batch {image_features.shape[0]}")
    device = image_features.device
    p_img, p_txt = teacher_probabilities(
        teacher_image.to(device), teacher_text.to(device), dims, scales,
        None if all_teacher_image is None else all_teacher_image.to(device),
        None if all_teacher_text is None else all_teacher_text.to(device))
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale, all_image_features,
                                                    all_text_features)
    return 0.5 * (_soft_ce(p_img, logits_per_image) + _soft_ce(p_txt, logits_per_text))


def feature_l2(student: torch.Tensor, teacher: torch.Tensor, projections: nn.ModuleList,
               dims: Sequence[int]) -> torch.Tensor:
    """F(x, T): the mean over teachers k and rows i of ||normalise(W_k x_i) - normalise(T[k]_i)||^2 (float32; the
    teacher side carries no gradient)."""
    slices = teacher.detach().float().split(list(dims), 1)
    terms = [(F.normalize(proj(student).float(), dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(dim=1).mean()
             for proj, t in zip(projections, slices)]
    return torch.stack(terms).mean()


def mobileclip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    teacher_image: torch.Tensor, teacher_text: torch.Tensor, dims: Sequence[int],
                    scales: Sequence[float], lam: float, *, all_image_features: torch.Tensor | None = None,
                    all_text_features: torch.Tensor | None = None, all_teacher_image: torch.Tensor | None = None,
                    all_teacher_text: torch.Tensor | None = None, offset: int = 0,
                    clip_part: Callable[[], torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L(B), CLIP(B), KD(B)); the term with weight 0 is computed without a graph, for logging only. With the
    global batch (`all_*`, this rank's rows starting at `offset`), every term is the mean over this rank's rows.
    CLIP(B) is CLIP's InfoNCE, or `clip_part()` where given (the contrastive objective's loss on this batch)."""
    student = {"all_image_features": all_image_features, "all_text_features": all_text_features}
    with torch.set_grad_enabled(torch.is_grad_enabled() and lam < 1.0):
        clip = (clip_part() if clip_part is not None
                else contrastive_loss(image_features, text_features, logit_scale, **student, offset=offset))
    with torch.set_grad_enabled(torch.is_grad_enabled() and lam > 0.0):
        kd = distillation_kd(image_features, text_features, logit_scale, teacher_image, teacher_text, dims, scales,
                             **student, all_teacher_image=all_teacher_image, all_teacher_text=all_teacher_text)
    if lam == 0.0:
        return clip, clip, kd
    if lam == 1.0:
        return kd, clip, kd
    return (1.0 - lam) * clip + lam * kd, clip, kd


class DistillationObjective(Objective):
    """MobileCLIP's loss over a reinforced dataset: the ground-truth captions ("real"), one synthetic caption per
    sample through a second pass of the text tower ("synthetic"), or both. With `feature_weight` > 0 it has the
    feature distillation's projections (`embed_dim` -> each teacher's width, one for images, one for texts), which
    train with the model and are not exported.

    `clip`: the contrastive objective whose loss is CLIP's part of L(B) on each caption batch (its softened targets,
    and an EMA similarity computed from that batch's captions); None: CLIP's InfoNCE. It is a submodule, so its EMA
    copy follows the model (`after_step`)."""

    name = "distill"

    def __init__(self, dims: Sequence[int], scales: Sequence[float], lam: float = 1.0, caption_batches: str = "both",
                 weight: float = 1.0, feature_weight: float = 0.0, embed_dim: int | None = None,
                 clip: ContrastiveObjective | None = None):
        super().__init__(weight)
        self.clip = clip
        self.dims, self.scales = [int(d) for d in dims], [float(s) for s in scales]
        if not self.dims or len(self.dims) != len(self.scales):
            raise ValueError(f"need one scale per teacher: dims {self.dims}, scales {self.scales}")
        if any(d <= 0 for d in self.dims) or any(not s > 0 for s in self.scales):
            raise ValueError(f"teacher dims must be positive and scales > 0: dims {self.dims}, scales {self.scales}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam} must lie in [0, 1]")
        if caption_batches not in CAPTION_BATCHES:
            raise ValueError(f"caption_batches={caption_batches!r} must be one of {CAPTION_BATCHES}")
        self.lam, self.caption_batches = float(lam), caption_batches
        self.feature_weight = float(feature_weight)
        if self.feature_weight < 0 or (self.feature_weight > 0 and not embed_dim):
            raise ValueError(f"feature_weight={feature_weight} must be >= 0 and needs the student's embed_dim")
        if self.feature_weight > 0:
            self.image_projections = nn.ModuleList(nn.Linear(embed_dim, d, bias=False) for d in self.dims)
            self.text_projections = nn.ModuleList(nn.Linear(embed_dim, d, bias=False) for d in self.dims)

    @staticmethod
    def _extra(ctx: StepContext, key: str) -> torch.Tensor:
        if key not in ctx.extras:
            raise ValueError(f"the distill objective needs a reinforced dataset (`lightclip reinforce`): the batch "
                             f"has no {key!r}")
        return ctx.extras[key]

    def forward(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        image, scale = outputs["image_features"], outputs["logit_scale"]
        teacher_image = self._extra(ctx, "teacher_image_emb").to(image.device)
        batches: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        terms: dict[str, torch.Tensor | float] = {}
        if self.caption_batches in ("both", "real"):
            batches["real"] = outputs["text_features"], self._extra(ctx, "teacher_text_emb"), ctx.tokens
        if self.caption_batches in ("both", "synthetic"):
            syn_tokens, teacher_syn = self._extra(ctx, "syn_tokens"), self._extra(ctx, "teacher_syn_text_emb")
            syn_tokens = (trim_padding(syn_tokens) if ctx.model.ignores_padding() else syn_tokens).to(image.device)
            syn = ctx.model.encode_text(syn_tokens, normalize=True)
            batches["syn"] = syn, teacher_syn, syn_tokens
            if "syn_kept" in ctx.extras:  # the synthetic-caption filter's share kept in this batch (data/caption_filter)
                terms["distill_syn_kept"] = ctx.extras["syn_kept"].float().mean()
        # this rank's rows against the global batch: the same gathered image features for both caption batches
        columns = {"all_image_features": gather_with_grad(image), "all_teacher_image": gather_no_grad(teacher_image),
                   "offset": row_offset(image.shape[0])}
        total = image.new_zeros((), dtype=torch.float32)
        if self.feature_weight:
            feature = feature_l2(image, teacher_image, self.image_projections, self.dims)
            terms["distill_feature_image"] = feature.detach()
            total = total + self.feature_weight * feature
        for tag, (text, teacher_text, tokens) in batches.items():
            teacher_text = teacher_text.to(image.device)
            loss, clip, kd = mobileclip_loss(image, text, scale, teacher_image, teacher_text, self.dims, self.scales,
                                             self.lam, all_text_features=gather_with_grad(text),
                                             all_teacher_text=gather_no_grad(teacher_text), **columns,
                                             clip_part=self._clip_part(outputs, text, tokens, ctx, terms))
            total = total + loss
            terms[f"distill_kd_{tag}"], terms[f"distill_clip_{tag}"] = kd.detach(), clip.detach()
            if self.feature_weight:
                feature = feature_l2(text, teacher_text, self.text_projections, self.dims)
                terms[f"distill_feature_{tag}"] = feature.detach()
                total = total + self.feature_weight * feature
        return {"distill_loss": total, **terms}

    def _clip_part(self, outputs: dict[str, torch.Tensor], text: torch.Tensor, tokens: torch.Tensor,
                   ctx: StepContext, terms: dict[str, torch.Tensor | float]) -> Callable[[], torch.Tensor] | None:
        """CLIP's part of L(B) for the caption batch `text` (encoded from `tokens`): the contrastive objective's loss
        on it; its diagnostics (the softening eps, a sigmoid's bias) go to `terms`."""
        if self.clip is None:
            return None

        def part() -> torch.Tensor:
            named = self.clip({**outputs, "text_features": text}, replace(ctx, tokens=tokens))
            terms.update({k: v for k, v in named.items() if not k.endswith("_loss")})
            return named["contrastive_loss"]

        return part

    def after_step(self, model: nn.Module) -> None:
        if self.clip is not None:
            self.clip.after_step(model)
