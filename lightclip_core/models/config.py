"""The `model` section of params.yaml: the student's image and text towers and the shared embedding. `config.py`
composes it with the other sections."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lightclip_core.infra.schema import Section, drop_nulls, merge
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
    tower: str = Field("mobilenetv2_100", description="any timm model name")
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

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
        return name

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        return std


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
    init_from: str | None = Field(
        None, min_length=1,
        description="start training from these weights instead of a random initialisation (step 0 only; a resumed "
                    "run continues from its checkpoint): a training checkpoint (`.pt`, or a train output directory: "
                    "its final.pt), an export directory of this architecture, an s3:// URI of either, or a registered "
                    "model `models:/<name>@<alias>` | `models:/<name>/<version>`; null: random")

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the network, as JSON (all but `init_from`, which says where its first weights come
        from): what checkpoints and exports record as `model_config`, and what two configurations must share for
        one's weights to load into the other."""
        return self.model_dump(mode="json", exclude={"init_from"})

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # A null counts as unset, like an absent key: params.yaml spells out every field (null where a preset may
        # fill it), so `dvc exp run -S model.preset=...` takes effect without deleting lines.
        if not isinstance(data, dict):
            return data
        explicit = drop_nulls(data)
        name = explicit.get("preset")
        return merge(preset_values(name), explicit) if isinstance(name, str) and is_preset(name) else explicit

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
