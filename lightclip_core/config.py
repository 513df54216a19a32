"""The schema of params.yaml: one pydantic model per section, strict, with one-line errors.

Every command loads its parameters through :func:`load_config`; a bad value raises :class:`ConfigError`, whose
message names the field, the value and what is allowed. The CLI turns it into exit code 2 before any work.

This module composes the sections. The `model` section's classes belong to the models (lightclip_core/models/config.py)
and the section base and ConfigError to the bottom layer (lightclip_core/infra/schema.py); both are re-exported here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lightclip_core.evaluate_config import DEFAULT_TEMPLATES, BenchmarkSpec, EvaluateConfig
from lightclip_core.infra.augment_params import CAPTION_SAFE_OPS, OpPool, OrderedRange
from lightclip_core.infra.params_file import load_yaml, read_params_file, yaml_problem
from lightclip_core.infra.schema import ConfigError, Section, merge
from lightclip_core.models.config import ImageConfig, ModelConfig, TextConfig
from lightclip_core.resources_config import ResourcesConfig
from lightclip_core.teacher_config import CocaTeacherConfig, QualityGateConfig, TeacherConfig, TeacherSpec

__all__ = ["BenchmarkSpec", "CocaTeacherConfig", "Config", "ConfigError", "ContrastiveObjectiveConfig",
           "DEFAULT_TEMPLATES", "DataConfig", "DistillObjectiveConfig", "EvaluateConfig", "ExportConfig", "FusionPoint",
           "ImageConfig", "IngestData", "MLMObjectiveConfig", "ModelConfig", "ObjectivesConfig", "QualityGateConfig",
           "RegistryConfig", "ReinforceConfig", "SyntheticData", "TeacherConfig", "TeacherSpec", "TextConfig",
           "TokenObjectiveConfig", "TrackingConfig", "TrainConfig", "flatten", "load_config", "parse_overrides", "validate"]


# --------------------------------------------------------------------------------------------------- data
class SyntheticData(Section):
    num_train: int = Field(20000, ge=1)
    num_val: int = Field(1000, ge=1)
    num_test: int = Field(1000, ge=1)
    image_size: int = Field(64, ge=16, le=1024)
    noise_fraction: float = Field(0.1, ge=0.0, le=1.0, description="fraction of captions with a wrong attribute")


class IngestData(Section):
    path: str | None = Field(None, description="input directory, tar shard directory or caption JSON")
    images_dir: str | None = Field(None, description="image root for `coco` caption JSON")
    class_names: str | None = Field(None, description="optional file with one class name per line (imagefolder)")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions(self) -> IngestData:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction}; must be < 1")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "webdataset", "coco", "imagefolder"] = "synthetic"
    seed: int = Field(0, ge=0)
    samples_per_shard: int = Field(2000, ge=1)
    image_format: Literal["png", "jpg"] = "png"
    max_skip_fraction: float = Field(0.01, ge=0.0, le=1.0, description="every stage fails past this bad fraction")
    synthetic: SyntheticData = SyntheticData()
    ingest: IngestData = IngestData()

    @model_validator(mode="after")
    def _ingest_path(self) -> DataConfig:
        if self.source != "synthetic":
            if not self.ingest.path:
                raise ValueError(f"data.source={self.source!r} needs data.ingest.path")
            if not Path(self.ingest.path).exists():
                raise ValueError(f"data.ingest.path={self.ingest.path!r} does not exist")
            if self.source == "coco" and self.ingest.images_dir and not Path(self.ingest.images_dir).is_dir():
                raise ValueError(f"data.ingest.images_dir={self.ingest.images_dir!r} is not a directory")
        if self.ingest.class_names and not Path(self.ingest.class_names).is_file():
            raise ValueError(f"data.ingest.class_names={self.ingest.class_names!r} is not a file")
        return self


# -------------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    """Training. `batch_size` is the global batch of one optimizer step: a data-parallel job of N ranks with
    `accum_steps` micro-steps gives each rank batch_size / (N * accum_steps) samples per micro-step, so the same
    parameters train the same model on 1 or N processes (no learning-rate rescaling)."""

    seed: int = Field(0, ge=0)
    batch_size: int = Field(128, ge=2, description="global samples per optimizer step, over all ranks")
    accum_steps: int = Field(1, ge=1, description="micro-steps per optimizer step (gradient accumulation)")
    epochs: float = Field(2.0, gt=0, description="passes over the training split (fractions allowed)")
    samples_per_epoch: int | None = Field(
        None, ge=2, description="resampled 'virtual' epochs of this many samples (shards drawn with replacement "
                                "per seed and epoch); null: an epoch is one pass over the split")
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    lr: float = Field(2e-3, gt=0, le=1.0)
    image_lr: float | None = Field(
        None, gt=0, le=1.0, description="the image tower's learning rate (a CNN tolerates more than the text "
                                        "transformer); null: train.lr")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after the linear warm-up: cosine decay to zero, or constant")
    stored_views: bool = Field(True, description="on a reinforced split, train on its stored views also without "
                                                 "distillation (the same augmentation); false: the original images")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = Field(True, description="NHWC image tensors: faster convolutions on CPU and GPU")
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes; 0 loads in the training process")
    shuffle_buffer: int = Field(1000, ge=0)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    deterministic: bool = True
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")
    compile: bool = Field(False, description="torch.compile the training module")
    resume: bool = Field(True, description="continue from the newest valid checkpoint of the same configuration")
    dist_timeout_s: float = Field(600.0, gt=0, description="a rank waiting longer on the others fails the job")

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by train.accum_steps="
                             f"{self.accum_steps}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            raise ValueError(f"train.samples_per_epoch={self.samples_per_epoch} is smaller than train.batch_size="
                             f"{self.batch_size}")
        return self


# --------------------------------------------------------------------------------------------- objectives
class ContrastiveObjectiveConfig(Section):
    """Instance level: CLIP's loss over the batch, with softened targets for the negatives (LightCLIP 1.1). With
    distillation on, it is CLIP's part of the distillation loss on each caption batch, weighted by 1 - lam."""

    enabled: bool = True
    weight: float = Field(1.0, gt=0)
    loss: Literal["infonce", "max_violation", "sum_hinge", "sigmoid"] = Field(
        "infonce", description="infonce: CLIP; max_violation / sum_hinge: VSE++'s hinges on the cosine with `margin`; "
                               "sigmoid: SigLIP's pairwise loss (needs model.init_logit_bias)")
    margin: float = Field(0.2, gt=0.0, le=2.0, description="the hinges' margin on the cosine similarity")
    soft_targets: Literal["none", "uniform", "similarity"] = Field(
        "none", description="none: CLIP's one-hot targets; uniform: eps/(N-1) on every negative; similarity: eps * "
                            "softmax of a detached similarity over the negatives")
    eps_schedule: Literal["constant", "linear", "cosine"] = "linear"
    eps_start: float = Field(0.0, ge=0.0, lt=1.0)
    eps_end: float = Field(0.2, ge=0.0, lt=1.0)
    similarity_source: Literal["online", "ema"] = Field(
        "online", description="online: the model's own detached logits; ema: an EMA copy of the model (ALBEF)")
    ema_momentum: float = Field(0.995, gt=0.0, lt=1.0)
    similarity_temperature: float = Field(1.0, gt=0.0, description="divides the (scaled) similarity logits")

    @model_validator(mode="after")
    def _soft_targets_need_infonce(self) -> ContrastiveObjectiveConfig:
        if self.loss != "infonce" and self.soft_targets != "none":
            raise ValueError(f"objectives.contrastive.soft_targets={self.soft_targets!r} softens InfoNCE's targets "
                             f"only; set it to none for loss={self.loss!r}")
        return self


class TokenObjectiveConfig(Section):
    """Token level: words matched to patches by a (relaxed) bipartite assignment (LightCLIP 1.2)."""

    enabled: bool = False
    weight: float = Field(1.0, gt=0)
    image_stride: int = Field(16, ge=1, description="the image-tower stage whose map gives the patches (its stride)")
    matcher: Literal["hungarian", "max"] = Field("hungarian", description="max: each word its best patch (FILIP)")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="drop matched pairs below this cosine")
    patches_per_word: int = Field(1, ge=1)
    loss: Literal["cosine", "softmax"] = Field(
        "softmax", description="cosine: mean(1 - cos); softmax: the matched patch among the image's patches")
    temperature: float = Field(0.1, gt=0.0, description="softmax loss temperature")


class FusionPoint(Section):
    text_layer: int = Field(ge=0, description="0-based transformer layer after which the block attends")
    image_stride: int = Field(ge=1, description="the image-tower stage (its stride) attended to")


class MLMObjectiveConfig(Section):
    """Masked language modelling on a second text pass fused with image stage maps (LightCLIP 1.3)."""

    enabled: bool = False
    weight: float = Field(1.0, gt=0)
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    fusion: list[FusionPoint] = Field(
        default_factory=lambda: [FusionPoint(text_layer=1, image_stride=8), FusionPoint(text_layer=2, image_stride=16),
                                 FusionPoint(text_layer=3, image_stride=32)],
        description="cross-attention blocks; empty: MLM without fusion")
    fusion_init_std: float = Field(
        0.0, ge=0.0, le=1.0, description="std of each fusion block's output projection at the start; 0: an exact "
                                         "identity (LightCLIP); ITM needs > 0 (BERT/ALBEF: 0.02)")
    causal: bool = Field(False, description="attention of the masked pass; false: bidirectional")
    batch_fraction: float = Field(0.25, gt=0.0, le=1.0, description="share of the batch the masked pass reads")


class ITMObjectiveConfig(Section):
    """Image-text matching (ALBEF): matched / not matched from the fused pass (the fusion of `mlm.fusion`, shared
    with MLM), on each pair and one negative text per image and one negative image per text."""

    enabled: bool = False
    weight: float = Field(1.0, gt=0)
    negatives: Literal["hard", "random"] = Field(
        "hard", description="hard: drawn in proportion to the contrastive similarity; random: uniformly")


class DistillObjectiveConfig(Section):
    """MobileCLIP's distillation from the teacher embeddings a reinforced dataset stores (METHOD.md 2.2)."""

    enabled: bool = Field(True, description="needs a reinforced training split (`lightclip reinforce`)")
    weight: float = Field(1.0, gt=0)
    lam: float = Field(1.0, ge=0.0, le=1.0, description="L = (1 - lam) * CLIP + lam * KD per caption batch, CLIP "
                                                        "being objectives.contrastive's loss (the one instance term)")
    caption_batches: Literal["both", "real", "synthetic"] = Field(
        "real", description="both: L(real captions) + L(synthetic captions) over the same image features; real: "
                            "the default since issue #16's three seeds (as good, in about two thirds of the "
                            "training time, from separate runs)")
    teacher_scales: list[float] | None = Field(
        None, description="fixed scale s_k per teacher; null: the scales the reinforced split's manifest records")
    feature_weight: float = Field(1.0, ge=0.0, description="L2 feature distillation (Popp et al.): each student "
                                                           "embedding, through a training-only projection per "
                                                           "teacher, towards the teacher's stored one; 0: off")
    synthetic_filter_margin: float | None = Field(None, allow_inf_nan=False, description="keep a synthetic caption "
        "only when the teachers' score of it with the view is >= the ground truth's minus this margin (else the ground "
        "truth stands in); null: no filter (data/caption_filter.py)")

    @model_validator(mode="after")
    def _filter_has_synthetic_captions(self) -> DistillObjectiveConfig:
        if self.synthetic_filter_margin is not None and (not self.enabled or self.caption_batches == "real"):
            raise ValueError(f"objectives.distill.synthetic_filter_margin={self.synthetic_filter_margin} filters the "
                             f"synthetic captions, but distillation with caption_batches={self.caption_batches!r} "
                             f"(enabled={self.enabled}) uses none: set caption_batches to both or synthetic, or the "
                             f"margin to null")
        return self

    @field_validator("teacher_scales")
    @classmethod
    def _positive_scales(cls, scales: list[float] | None) -> list[float] | None:
        if scales is not None and (not scales or min(scales) <= 0):
            raise ValueError("expected one positive scale per teacher")
        return scales


class ObjectivesConfig(Section):
    contrastive: ContrastiveObjectiveConfig = ContrastiveObjectiveConfig()
    token: TokenObjectiveConfig = TokenObjectiveConfig()
    mlm: MLMObjectiveConfig = MLMObjectiveConfig()
    itm: ITMObjectiveConfig = ITMObjectiveConfig()
    distill: DistillObjectiveConfig = DistillObjectiveConfig()

    @model_validator(mode="after")
    def _something_to_train(self) -> ObjectivesConfig:
        if not (self.contrastive.enabled or self.token.enabled or self.mlm.enabled or self.itm.enabled
                or self.distill.enabled):
            raise ValueError("every objective is disabled; enable at least one of contrastive, token, mlm, itm, "
                             "distill")
        return self

    @model_validator(mode="after")
    def _one_instance_term(self) -> ObjectivesConfig:
        """With distillation on, the contrastive section is CLIP's part of `(1 - lam) * CLIP + lam * KD`."""
        if not self.distill.enabled:
            return self
        if self.distill.lam < 1.0 and not self.contrastive.enabled:
            raise ValueError(f"objectives.distill.lam={self.distill.lam} weights CLIP's part of the distillation loss "
                             f"by 1 - lam, and objectives.contrastive.enabled=false turns that part off: set lam to 1 "
                             f"or enable the contrastive objective")
        if self.contrastive.enabled and self.contrastive.weight != 1.0:
            raise ValueError(f"objectives.contrastive.weight={self.contrastive.weight}: with distillation on, CLIP's "
                             f"loss is part of the distillation loss, weighted by 1 - objectives.distill.lam; leave "
                             f"the weight at 1")
        return self

    @model_validator(mode="after")
    def _itm_sees_the_image(self) -> ObjectivesConfig:
        if self.itm.enabled and not self.mlm.fusion:
            raise ValueError("objectives.itm.enabled=true needs a fusion point in objectives.mlm.fusion (the fused "
                             "pass that ITM shares with MLM); without one the matching head never sees the image")
        return self


# ---------------------------------------------------------------------------------------- teacher, reinforce
class ReinforceConfig(Section):
    """Dataset reinforcement (METHOD.md 2.1): augmentations, synthetic captions and teacher embeddings, once."""

    num_augmentations: int = Field(2, ge=1, le=100)
    num_captions: int = Field(1, ge=1, le=20, description="synthetic captions per image")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    max_caption_tokens: int = Field(20, ge=2, le=76, description="generated tokens before the cut at the first period")
    image_size: int | None = Field(None, ge=16, description="size the augmentations are sampled at; null: the first "
                                                            "teacher's input size")
    crop_scale: OrderedRange = Field((0.75, 1.0), description="RandomResizedCrop area fraction range")
    crop_ratio: OrderedRange = Field((0.9, 1.1111), description="RandomResizedCrop aspect ratio range")
    rand_augment_ops: int = Field(2, ge=0, le=4, description="RandAugment ops per view, drawn from `ops`")
    rand_augment_magnitude: int = Field(9, ge=0, le=30, description="the magnitude bin of `ops: all`")
    ops: OpPool = Field(default_factory=lambda: dict(CAPTION_SAFE_OPS), description="RandAugment's op pool: all ("
                        "torchvision's 14 ops at rand_augment_magnitude, MobileCLIP) or {op name: magnitude bin}")
    batch_size: int = Field(256, ge=1, description="teacher batch (inference mode)")
    embedding_dtype: Literal["float16", "float32"] = "float16"
    seed: int = Field(0, ge=0)


# ------------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    onnx: bool = True
    opset: int = Field(18, ge=13, le=23)
    parity_tolerance: float = Field(1e-4, gt=0)
    parity_batch: int = Field(4, ge=2)
    wise_ft_alpha: float = Field(1.0, ge=0, le=1, description="WiSE-FT: export (1 - a) * start + a * fine-tuned "
                                 "weights of a run started from weights (model.init_from); 1: the fine-tuned model")


# ----------------------------------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    experiment: str = Field("lightclip", min_length=1)
    uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo")
    enabled: bool = True
    spool_dir: str = Field("mlflow-spool", min_length=1,
                           description="journal of tracking operations not yet delivered; `lightclip tracking sync`")
    flush_timeout_s: float = Field(30.0, ge=0, description="at the end of a stage, how long to wait for the server")
    system_metrics_interval_s: float = Field(10.0, ge=0, description="CPU/memory/GPU sampling period; 0: off")


# ----------------------------------------------------------------------------------------------- registry
class RegistryConfig(Section):
    enabled: bool = True
    model_name: str = Field("lightclip", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="registered model name: letters, digits, _ . -")
    gate_metric: str = Field("zeroshot/colour_shape/top1", min_length=1,
                             description="key of the evaluation metrics.json; higher is better")
    margin: float = Field(0.0, ge=0.0, description="champion moves only if the candidate beats it by more than this")
    min_gate_value: float | None = Field(
        None, description="evaluation gate: a model whose gate_metric is below this is not registered at all "
                          "(the Kubeflow DAG's dsl.If); null: every evaluated model is registered")


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    teacher: TeacherConfig = TeacherConfig()
    reinforce: ReinforceConfig = ReinforceConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()  # Kubeflow tasks' CPU and memory; read by no stage

    @model_validator(mode="after")
    def _sigmoid_loss_has_a_bias(self) -> Config:
        sigmoid = self.objectives.contrastive.enabled and self.objectives.contrastive.loss == "sigmoid"
        if sigmoid != (self.model.init_logit_bias is not None):
            raise ValueError(f"model.init_logit_bias={self.model.init_logit_bias}: the sigmoid loss needs the "
                             f"model's learnable bias (SigLIP: -10 with init_logit_scale 2.3026) and nothing else "
                             f"trains it; set it exactly when objectives.contrastive.loss=sigmoid")
        return self

    @model_validator(mode="after")
    def _gate_names_a_configured_benchmark(self) -> Config:
        kind, _, rest = self.registry.gate_metric.partition("/")
        names = [s.name for s in self.evaluate.benchmarks]
        if kind == "benchmark" and rest.partition("/")[0] not in names:
            raise ValueError(f"registry.gate_metric={self.registry.gate_metric!r} names a benchmark set that is not "
                             f"in evaluate.benchmarks; configured: {names}")
        return self

    def flat(self) -> dict[str, Any]:
        """Parameters flattened to dotted keys, as logged to MLflow."""
        return flatten(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------- loading
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _dotted(loc: tuple[Any, ...]) -> str:
    """A validation error's location as params.yaml spells it: `objectives.mlm.fusion[0].text_layer`."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _one_line(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = _dotted(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key (value {first['input']!r}); check the spelling against params.yaml"
    value = first.get("input")
    if not loc or isinstance(value, dict):  # a section-level validator: its message names the fields
        return f"{loc}: {msg}" if loc else msg
    if first["type"] == "missing" and isinstance(first["loc"][-1], int):  # a short tuple such as mean/std
        parent = _dotted(first["loc"][:-1])
        return f"{parent}: too few values, {msg.lower()} at index {first['loc'][-1]}"
    return f"{loc}={value!r}: {msg}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p!r} is set to the value {node!r}, not a section of keys")
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings to a nested dict; values are parsed as YAML (scalars, or flow lists and mappings)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, text = pair.split("=", 1)
        key = key.strip()
        if not all(key.split(".")):
            raise ConfigError(f"override {pair!r}: expected a dotted key such as train.lr before '='")
        try:
            value = load_yaml(text) if text else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML: {yaml_problem(err, False)}") from None
        _set_dotted(tree, key, value)
    return tree


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, raw)) from None


def load_config(path: str | os.PathLike | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (if given), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_params_file(Path(path))
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
    return validate(raw)
