"""The `evaluate` section of params.yaml: the zero-shot tasks and retrieval of the test split, and the standard
benchmark sets evaluated beside it. `config.py` composes it with the other sections."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lightclip_core.infra.schema import Section

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture showing a {}.")
BENCHMARK_FORMATS = ("imagefolder", "wds", "coco", "karpathy")
_FILE_FORMATS = ("coco", "karpathy")  # a caption JSON file plus an image folder


def template_slot(template: str) -> str:
    """A prompt template with the class-name slot as `{}` (CLIP_benchmark's files spell it `{c}`)."""
    return template.replace("{c}", "{}")


def check_templates(templates: list[str]) -> list[str]:
    """The templates with their slot spelled `{}`; each must have one."""
    if not templates:
        raise ValueError("at least one template is needed")
    for t in templates:
        if "{}" not in template_slot(t):
            raise ValueError(f"template {t!r} has no '{{}}' (or '{{c}}') slot for the class name")
    return [template_slot(t) for t in templates]


class BenchmarkSpec(Section):
    """One benchmark set, read where it lies (a local path or `s3://`), as CLIP_benchmark and the datasets lay it out:

    - `imagefolder` (zero-shot classification): `path/<class>/*.jpg|png|webp`; class names from `class_names`, else
      `path/classnames.txt` (one per class directory, in sorted order), else the directory names; templates from
      `templates`, else `path/zeroshot_classification_templates.txt`, else `evaluate.templates`.
    - `wds` (CLIP_benchmark's WebDataset export): `path/<split>/nshards.txt` and `0.tar`..`n-1.tar`;
      `path/dataset_type.txt` says `retrieval` (each sample's `txt` holds its captions, one per line) or, when absent,
      classification (`cls` holds the class index; `path/classnames.txt` and the templates as above).
    - `coco` (retrieval): COCO's caption JSON (`images` with `id` and `file_name`, `annotations` with `image_id` and
      `caption`) at `path`; images under `images_dir` (default: the JSON's folder).
    - `karpathy` (retrieval): Karpathy's split JSON of Flickr8k/30k and COCO (`images` with `filename`, optional
      `filepath`, `split` and `sentences[].raw`) at `path`; the images of split `split` under `images_dir`.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="the metrics' prefix, benchmark/<name>/...: letters, digits, _ . -")
    format: Literal["imagefolder", "wds", "coco", "karpathy"]
    path: str = Field(min_length=1, description="the set's root directory (imagefolder, wds) or JSON file")
    images_dir: str | None = Field(None, description="coco, karpathy: the image folder; null: the JSON's folder")
    split: str = Field("test", min_length=1, description="wds: the split folder; karpathy: the images' split")
    class_names: str | None = Field(None, description="imagefolder: a file of class names, one per directory")
    templates: list[str] | None = Field(None, description="classification prompts; null: the set's own, else "
                                                          "evaluate.templates")

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        return None if templates is None else check_templates(templates)

    @model_validator(mode="after")
    def _fields_of_the_format(self) -> BenchmarkSpec:
        if self.images_dir is not None and self.format not in _FILE_FORMATS:
            raise ValueError(f"images_dir is for the {' and '.join(_FILE_FORMATS)} formats, not {self.format}")
        if self.class_names is not None and self.format != "imagefolder":
            raise ValueError(f"class_names is for the imagefolder format, not {self.format} (wds sets carry "
                             "classnames.txt)")
        if self.templates is not None and self.format in _FILE_FORMATS:
            raise ValueError(f"templates are for zero-shot classification; a {self.format} set is for retrieval")
        return self


class EvaluateConfig(Section):
    tasks: list[str] | None = Field(None, description="zero-shot tasks from the test manifest; default: all")
    templates: list[str] = list(DEFAULT_TEMPLATES)
    recall_at: list[int] = [1, 5, 10]
    batch_size: int = Field(256, ge=1)
    benchmarks: list[BenchmarkSpec] = Field(
        [], description="standard sets evaluated beside the test split, metrics under benchmark/<name>/")
    wise_ft_alphas: list[float] = Field(
        [], description="WiSE-FT: also evaluate the weights (1 - a) * start + a * fine-tuned at each a (a run started "
                        "from weights, model.init_from), metrics under wise_ft/<a>/; []: off")

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        return check_templates(templates)

    @field_validator("recall_at")
    @classmethod
    def _positive_k(cls, ks: list[int]) -> list[int]:
        if not ks or min(ks) < 1:
            raise ValueError(f"recall_at must be a non-empty list of positive integers, got {ks}")
        return ks

    @field_validator("wise_ft_alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, alphas: list[float]) -> list[float]:
        bad = next((a for a in alphas if not 0 <= a <= 1), None)
        if bad is not None:
            raise ValueError(f"every alpha must be in [0, 1], got {bad}")
        if len(set(alphas)) != len(alphas):
            raise ValueError("alphas must be distinct")
        return sorted(alphas)

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, sets: list[BenchmarkSpec]) -> list[BenchmarkSpec]:
        names = [s.name for s in sets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"benchmark names must be unique; {twice[0]!r} is used twice")
        return sets
