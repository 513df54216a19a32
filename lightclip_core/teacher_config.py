"""The `teacher` section of params.yaml: the teachers and captioner of dataset reinforcement, the embedded default's
own trained teachers, and the quality gate `reinforce` applies to them (composed into `lightclip_core.config`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lightclip_core.infra.schema import Section


class QualityGateConfig(Section):
    """Minimum quality of the teachers and the captioner on the validation split (measured by the `teacher` stage);
    below it `reinforce` stops before writing a shard. null: that figure is not checked."""

    min_colour_shape: float | None = Field(None, ge=0, le=1, description="each teacher's zero-shot colour+shape "
                                                                         "top-1")
    min_caption_colour: float | None = Field(None, ge=0, le=1, description="captions naming the right colour")
    min_caption_shape: float | None = Field(None, ge=0, le=1, description="captions naming the right shape")


class TeacherSpec(Section):
    """One open_clip model, loaded through open_clip's own factory."""

    model: str = Field(min_length=1, description="open_clip model name (ViT-L-14, coca_ViT-B-32), or "
                                                 "local-dir:PATH (open_clip_config.json + weights)")
    pretrained: str | None = Field(None, description="pretrained tag, or checkpoint path or s3:// URI")
    logit_scale: float | None = Field(None, gt=0, description="fixed distillation scale s_k; null: the model's own")


class CocaTeacherConfig(Section):
    """A teacher the `teacher` stage trains on the training split, since no weights can be downloaded: open_clip's
    CoCa with a small config (contrastive plus captioning loss; also the captioner), or open_clip's CLIP with a timm
    image tower (contrastive loss; a second, different teacher)."""

    kind: Literal["coca", "clip", "captioning_clip"] = Field(
        "coca", description="coca: open_clip CoCa (ViT); clip: open_clip CLIP with a timm tower; captioning_clip: that "
                            "CLIP trained jointly with a small captioning decoder over its tower (also the captioner)")
    tower: str | None = Field(None, description="clip, captioning_clip: the timm image tower (e.g. mobilenetv2_100); "
                                                "coca: a ViT, unset")
    output_stride: Literal[8, 16, 32] | None = Field(None, description="the timm tower's total stride (dilated last "
                                                                       "stages); null: its own")
    max_vocab: int = Field(1024, ge=8, description="captioning_clip: the decoder's vocabulary, the most frequent "
                                                   "tokens of the training captions")
    embed_dim: int = Field(192, ge=8)
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(8, ge=2)
    vision_width: int = Field(192, ge=16)
    vision_layers: int = Field(4, ge=1)
    vision_heads: int = Field(3, ge=1)
    text_width: int = Field(192, ge=16)
    text_layers: int = Field(3, ge=1)
    text_heads: int = Field(3, ge=1)
    decoder_layers: int = Field(1, ge=1, description="multimodal (captioning) decoder layers")
    context_length: int = Field(20, ge=8, le=77)
    steps: int = Field(250, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(25, ge=0)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after the warm-up")
    clip_loss_weight: float = Field(1.0, ge=0)
    caption_loss_weight: float = Field(1.0, ge=0)
    seed: int = Field(0, ge=0)
    pretrain_steps: int = Field(0, ge=0, description="clip, captioning_clip: steps of supervised training of the "
                                                     "tower on the training split's labels before the contrastive "
                                                     "training (LiT's supervised tower); 0: none")
    pretrain_lr: float = Field(3e-3, gt=0, le=1.0, description="that training's AdamW lr (30-step warm-up, then "
                                                               "constant)")
    pretrain_labels: list[str] = Field(["colour", "shape", "size", "position"], min_length=1,
                                       description="keys of the samples' json metadata, one linear head each")
    lock_tower: bool = Field(False, description="the pretrained tower stays fixed (weights and batch-norm statistics) "
                                                "during the contrastive training, LiT's locked image tower; its "
                                                "projection trains")

    @model_validator(mode="after")
    def _geometry(self) -> CocaTeacherConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
        if self.kind != "coca" and not self.tower:
            raise ValueError(f"kind={self.kind} needs a timm image tower (tower: resnet18, ...)")
        if self.kind == "coca" and (self.tower or self.output_stride):
            raise ValueError(f"tower={self.tower!r}, output_stride={self.output_stride}: a CoCa teacher has a ViT "
                             "image tower (set by the vision_* fields)")
        if self.kind == "coca" and (self.pretrain_steps or self.lock_tower):
            raise ValueError(f"pretrain_steps={self.pretrain_steps}, lock_tower={self.lock_tower}: tower pretraining "
                             "is for a timm tower (kind clip or captioning_clip)")
        if self.lock_tower and not self.pretrain_steps:
            raise ValueError("lock_tower=true needs pretrain_steps > 0 (a locked random tower learns nothing)")
        if self.kind == "coca" and self.text_width != self.embed_dim:  # CoCa's decoder: one width for text and image
            raise ValueError(f"text_width={self.text_width} must equal embed_dim={self.embed_dim} (CoCa's decoder "
                             f"reads text tokens and pooled image tokens at one width)")
        for side in ("vision", "text"):
            width, heads = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            if width % heads:
                raise ValueError(f"{side}_heads={heads} does not divide {side}_width={width}")
        return self


def lit_teacher() -> CocaTeacherConfig:
    """The embedded default's teacher: a ResNet-18 trained on the samples' labels, then locked while a text tower and a
    captioning decoder train (LiT; it is also the captioner)."""
    return CocaTeacherConfig(kind="captioning_clip", tower="resnet18", embed_dim=256, text_width=256, text_layers=4,
                             text_heads=4, decoder_layers=2, context_length=32, steps=300, batch_size=128,
                             warmup_steps=25, pretrain_steps=300, lock_tower=True)


DEFAULT_GATE = 0.85  # issue #15's bar for a teacher's colour+shape and the captions' colour and shape


class TeacherConfig(Section):
    train: CocaTeacherConfig = Field(default_factory=lit_teacher)
    second: CocaTeacherConfig | None = Field(None, description="a second, different trained teacher in the ensemble; "
                                                               "null: none")
    ensemble: list[TeacherSpec] = Field(
        default_factory=list, description="the teachers whose embeddings are stored; empty: the trained teacher")
    captioner: TeacherSpec | None = Field(None, description="an open_clip CoCa model; null: the trained teacher")
    gate: QualityGateConfig = QualityGateConfig(min_colour_shape=DEFAULT_GATE, min_caption_colour=DEFAULT_GATE,
                                                min_caption_shape=DEFAULT_GATE)
