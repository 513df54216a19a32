"""Are the teachers and the captioner worth distilling from? Their quality on a held-out split, and the gate that
`reinforce` applies before it writes a shard (issue #15: a shape-blind teacher must not be distilled silently).

- each teacher: zero-shot top-1 on every task of the split's manifest (class prompts averaged over the templates, the
  teacher's own tokenizer) and strict retrieval R@1 both ways (`lightclip_core.evaluate.retrieval`);
- the captioner: the share of its captions, as sampled for reinforcement and before any filtering, that name the
  image's colour and its shape (read with the synthetic grammar's parser; only for splits with those labels).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lightclip_core.config import ConfigError, DataConfig, QualityGateConfig, ReinforceConfig
from lightclip_core.data.caption_attributes import parse_caption
from lightclip_core.data.shards import decode_caption, decode_image, decode_meta, decoded, iter_raw_samples, \
    read_manifest, shard_refs
from lightclip_core.data.skips import SkipTally
from lightclip_core.evaluate.retrieval import retrieval_metrics
from lightclip_core.reinforce.captioner import Captioner
from lightclip_core.reinforce.teachers import Teacher, encode_text

log = logging.getLogger(__name__)


class QualityGateError(ConfigError):
    """A teacher or the captioner is below `teacher.gate`: nothing was reinforced."""


def load_split(split_dir: str | os.PathLike, limit: int | None = None, max_skip_fraction: float | None = None
               ) -> tuple[list, list[str], list[dict], dict]:
    """(PIL images, captions, metadata, the manifest's zero-shot tasks) of the first `limit` usable samples of a
    split. Bad samples are skipped and counted; past `max_skip_fraction` of what was read (default:
    data.max_skip_fraction's) a DataError."""
    if max_skip_fraction is None:
        max_skip_fraction = DataConfig.model_fields["max_skip_fraction"].default
    manifest = read_manifest(split_dir)
    tally = SkipTally()
    images, captions, metas = [], [], []
    raws = iter_raw_samples(shard_refs(split_dir, manifest), tally)
    for image, caption, meta in decoded(raws, lambda r: (decode_image(r), decode_caption(r), decode_meta(r)), tally):
        if limit is not None and len(images) >= limit:
            break
        images.append(image)
        captions.append(caption)
        metas.append(meta)
    if tally.seen:  # an empty split is the caller's to judge
        tally.check(max_skip_fraction, f"split {split_dir}")
    return images, captions, metas, manifest.get("tasks") or {}


@torch.inference_mode()
def _encode_images(teacher: Teacher, images: Sequence, batch: int) -> torch.Tensor:
    return torch.cat([F.normalize(teacher.model.encode_image(
        torch.stack([teacher.transform(im) for im in images[i:i + batch]]).to(teacher.device)).float(), dim=-1)
        for i in range(0, len(images), batch)])


@torch.inference_mode()
def _encode_texts(teacher: Teacher, texts: Sequence[str], batch: int) -> torch.Tensor:
    return torch.cat([F.normalize(encode_text(teacher.model, teacher.tokenizer(list(texts[i:i + batch]))
                                              .to(teacher.device)).float(), dim=-1)
                      for i in range(0, len(texts), batch)])


def teacher_quality(teacher: Teacher, images: Sequence, captions: Sequence[str], metas: Sequence[dict],
                    tasks: dict[str, Any], templates: Sequence[str], batch: int = 256) -> dict[str, float]:
    """`zeroshot/<task>/top1` for every task and `retrieval/<direction>/R@1` (strict) of one teacher."""
    image_emb = _encode_images(teacher, images, batch)
    out: dict[str, float] = {}
    for task, spec in tasks.items():
        classes = list(spec["classes"])
        weights = []
        for name in classes:
            prompts = [t.format(name.replace("_", " ")) for t in (spec.get("templates") or templates)]
            weights.append(F.normalize(_encode_texts(teacher, prompts, batch).mean(0), dim=0))
        predicted = (image_emb @ torch.stack(weights).T).argmax(1)
        labels = torch.tensor([classes.index(m[spec["label_key"]]) for m in metas])
        out[f"zeroshot/{task}/top1"] = float((predicted == labels).float().mean())
    recalls = retrieval_metrics(image_emb, _encode_texts(teacher, captions, batch), list(range(len(captions))), (1,))
    out.update({f"retrieval/{direction}/R@1": per_k[1] for direction, per_k in recalls.items()})
    return out


def caption_quality(captioner: Captioner, images: Sequence, metas: Sequence[dict], cfg: ReinforceConfig,
                    batch: int = 256) -> dict[str, float]:
    """Shares of sampled captions naming the image's true colour, its true shape, and both (unparseable captions
    count as wrong), with reinforcement's own sampling settings; empty when the split has no such labels."""
    if not metas or "colour" not in metas[0] or "shape" not in metas[0]:
        return {}
    generator = torch.Generator(device=captioner.device).manual_seed(cfg.seed)
    colour = shape = both = total = 0
    for i in range(0, len(images), batch):
        pixels = torch.stack([captioner.preprocess(im) for im in images[i:i + batch]])
        texts = captioner.generate(pixels, cfg.num_captions, cfg.top_p, cfg.temperature, cfg.max_caption_tokens,
                                   generator)
        for meta, options in zip(metas[i:i + batch], texts, strict=True):
            for text in options:
                try:
                    named = parse_caption(text)
                except ValueError:
                    named = None
                c = named is not None and named.colour == meta["colour"]
                s = named is not None and named.shape == meta["shape"]
                colour, shape, both, total = colour + c, shape + s, both + (c and s), total + 1
    return {"captions/colour": colour / total, "captions/shape": shape / total, "captions/colour_shape": both / total}


def check_gate(quality: dict[str, dict[str, float]], gate: QualityGateConfig) -> None:
    """Raise QualityGateError naming the first teacher (or the captioner), figure and threshold below the gate.
    `quality` maps a teacher's name to its figures (`teacher_quality`), `captioner` to `caption_quality`'s."""
    checks = [("zeroshot/colour_shape/top1", gate.min_colour_shape, name) for name in quality if name != "captioner"]
    checks += [(f"captions/{a}", getattr(gate, f"min_caption_{a}"), "captioner") for a in ("colour", "shape")]
    for key, threshold, name in checks:
        value = quality.get(name, {}).get(key)
        if threshold is None or value is None:
            continue
        if value < threshold:
            raise QualityGateError(f"teacher.gate: {name} has {key} = {value:.3f}, below the threshold {threshold} "
                                   "(nothing was reinforced; train a better teacher or lower the gate)")
    log.debug("teacher quality gate passed: %s", quality)


def recorded_quality(metrics: dict[str, float], teachers: Sequence[str], captioner: bool) -> dict[str, dict]:
    """The `quality/<name>/...` figures of the teacher stage's metrics, for the teachers (and captioner) in use."""
    names = [*teachers, *(["captioner"] if captioner else [])]
    out: dict[str, dict[str, float]] = {name: {} for name in names}
    for key, value in metrics.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "quality" and parts[1] in out:
            out[parts[1]][parts[2]] = value
    return out
