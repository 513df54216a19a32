"""The `model` section of params.yaml: the student's image and text towers and the shared embedding. `config.py`
composes it with the other sections."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lightclip_core.infra.schema import Section, drop_nulls, merge
from lightclip_core.models.open_clip_arch import TOWER, fill_section, has_own_weights
from lightclip_core.models.registry import is_preset, list_presets, preset_values


class TextConfig(Section):
    kind: Literal["transformer", "mct"] = Field(
        "transformer", description="mct: MobileCLIP's RepMixer block, `layers` transformer layers, RepMixer block")
    context_length: int = Field(32, ge=4, le=77)
    width: int = Field(256, ge=8)
    heads: int = Field(4, ge=1)
    layers: int = Field(4, ge=1, le=24, description="transformer layers (for mct: between the two RepMixer blocks)")
    mlp_ratio: float = Field(4.0, gt=0)
    causal: bool = Field(True, description="causal attention as in CLIP; false: bidirectional, padding masked")
    mixer_kernel: int = Field(11, ge=1, description="mct: width of the 1 x k depthwise token-mixing kernel")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextConfig:
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} must be divisible by text.heads={self.heads}")
        return self

    @field_validator("mixer_kernel")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"must be odd so that token mixing keeps the sequence length, got {k}")
        return k


class ImageConfig(Section):
    tower: str = Field("repvit_m0_9", description=f"any timm model name ({TOWER!r}: an open_clip student's own, "
                                                      f"filled in from model.open_clip)")
    size: int = Field(64, ge=16, le=1024)
    output_stride: Literal[8, 16, 32] | None = Field(
        None, description="the tower's total stride (timm's output_stride: the last stages dilated instead of "
                          "strided, a finer last map for small images); null: the tower's own (32)")
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    @field_validator("tower")
    @classmethod
    def _known_tower(cls, name: str) -> str:
        import timm

        if name != TOWER and not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
        return name

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        return std


class OpenClipConfig(Section):
    """An open_clip architecture as the student (lightclip_core/models/open_clip_arch.py), the keys of a
    `teacher.ensemble` entry."""

    model: str | None = Field(None, min_length=1, description="an open_clip model name (MobileCLIP2-S0, ViT-B-32), "
                                                              "local-dir:PATH or hf-hub:ID (online)")
    pretrained: str | None = Field(None, min_length=1,
                                   description="its start weights: a pretrained tag, a checkpoint file or s3:// URI; "
                                               "null: a local-dir's own weights, else a random initialisation")
    model_cfg: dict[str, Any] | None = Field(None, description="filled in: open_clip's architecture of `model`, as "
                                                               "checkpoints and exports record it")

    @model_validator(mode="after")
    def _names_an_architecture(self) -> OpenClipConfig:
        if self.model is None and self.model_cfg is None:
            raise ValueError("model.open_clip needs `model`: an open_clip model name, local-dir:PATH or hf-hub:ID")
        return self


class ModelConfig(Section):
    """A null value in this section means "not set": the field takes the preset's value, else its default."""

    preset: str | None = Field(None, description="a named model (lightclip_core/models/registry.py)")
    embed_dim: int = Field(256, ge=8)
    init_logit_scale: float = Field(2.6592, description="log(1/0.07), the CLIP initialisation")
    max_logit_scale: float = Field(100.0, gt=1.0)
    init_logit_bias: float | None = Field(None, description="the sigmoid loss's learnable bias (SigLIP: -10); "
                                                            "null: the model has none")
    image: ImageConfig = ImageConfig()
    text: TextConfig = TextConfig()
    open_clip: OpenClipConfig | None = Field(
        None, description="{model, pretrained}: an open_clip architecture as the student, from its pretrained weights; "
                          "its fields fill the nulls of this section; null: this project's towers")
    init_from: str | None = Field(
        None, min_length=1,
        description="start training from these weights instead of a random initialisation (step 0 only; a resumed "
                    "run continues from its checkpoint): a training checkpoint (`.pt`, or a train output directory: "
                    "its final.pt), an export directory of this architecture, an s3:// URI of either, or a registered "
                    "model `models:/<name>@<alias>` | `models:/<name>/<version>`; null: random")

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the network, as JSON (all but `init_from` and the open_clip student's `model` and
        `pretrained`, which say where its architecture and first weights come from; its `model_cfg` is the
        architecture): what checkpoints and exports record as `model_config`, and what two configurations must share
        for one's weights to load into the other."""
        if self.open_clip is None:  # this project's student: the record it always had
            return self.model_dump(mode="json", exclude={"init_from", "open_clip"})
        return self.model_dump(mode="json", exclude={"init_from": True, "open_clip": {"model", "pretrained"}})

    def start_source(self) -> str | None:
        """Where the step-0 weights come from: `init_from`, the open_clip student's pretrained weights (a tag, a
        checkpoint, a local-dir's own file); None: a random initialisation."""
        if self.init_from is not None:
            return self.init_from
        spec = self.open_clip
        if spec is None or spec.model is None:
            return None
        if spec.pretrained is not None:
            return f"open_clip:{spec.model} pretrained={spec.pretrained}"
        return spec.model if has_own_weights(spec.model) else None

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # A null counts as unset, like an absent key: params.yaml spells out every field (null where a preset may
        # fill it), so `dvc exp run -S model.preset=...` takes effect without deleting lines.
        if not isinstance(data, dict):
            return data
        explicit = drop_nulls(data)
        name = explicit.get("preset")
        recorded = data.get("open_clip")
        if isinstance(recorded, dict) and isinstance(recorded.get("model_cfg"), dict):
            explicit["open_clip"]["model_cfg"] = recorded["model_cfg"]  # open_clip's own nulls mean something there
        if explicit.get("open_clip") is not None:
            if name is not None:
                raise ValueError("model.preset and model.open_clip both name the student; set one of them")
            return fill_section(explicit)
        return merge(preset_values(name), explicit) if isinstance(name, str) and is_preset(name) else explicit

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.image.tower == TOWER and self.open_clip is None:
            raise ValueError(f"model.image.tower={TOWER!r} stands for an open_clip student's tower; set "
                             f"model.open_clip, or name a timm model")
        if self.init_from is not None and self.open_clip is not None and (
                self.open_clip.pretrained is not None or has_own_weights(self.open_clip.model or "")):
            raise ValueError("model.init_from and model.open_clip's pretrained weights both name the start weights; "
                             "set one of them")
        return self

    @field_validator("init_from")
    @classmethod
    def _registry_uri_names_a_version(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("models:") and registered_model(value) is None:
            raise ValueError("a registered model is models:/<name>@<alias> or models:/<name>/<version>")
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        if name is not None and not is_preset(name):
            raise ValueError(f"unknown model preset; known: {', '.join(list_presets())}")
        return name


_REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))/?")


def registered_model(uri: str) -> tuple[str, str | None, str | None] | None:
    """`(name, alias, version)` of a model registry URI `models:/<name>@<alias>` or `models:/<name>/<version>` (one
    of alias and version is None); None for anything else."""
    found = _REGISTERED.fullmatch(uri)
    return (found["name"], found["alias"], found["version"]) if found else None
