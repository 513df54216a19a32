"""The `teacher` stage: train the embedded default's own small teachers (no weights can be downloaded).

A teacher is open_clip's CoCa (contrastive plus captioning loss; ViT image tower), open_clip's CLIP with a timm image
tower (contrastive loss), or that CLIP trained jointly with a small captioning decoder over its tower's last feature
map (`captioning_clip`; the decoder is published beside it as `captioner/`). A CoCa or a captioning CLIP gives both
the embedding teacher and the captioner of dataset reinforcement. The result is published as an open_clip local-dir, `out_dir/model/` (`open_clip_config.json` and
`open_clip_model.safetensors`), loadable with `open_clip.create_model("local-dir:out_dir/model")`. The directory is
built under a temporary name and renamed, so a reader never sees a half-written model.
"""
from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, CoCaLoss
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from lightclip_core.config import CocaTeacherConfig, DataConfig
from lightclip_core.data.prepare import swap_in
from lightclip_core.data.shards import ShardStream, decode_caption, decoded, iter_raw_samples, read_manifest, shard_refs
from lightclip_core.data.skips import SkipTally
from lightclip_core.infra.sink import MetricSink
from lightclip_core.infra.storage import atomic_path, write_json_atomic
from lightclip_core.models.open_clip_arch import CONFIG_FILE, WEIGHTS_FILES
from lightclip_core.models.timm_variants import dilated_name
from lightclip_core.models.tokenizer import trim_padding, vocab_size
from lightclip_core.reinforce.caption_decoder import CaptionDecoder, TowerCaptioner, caption_vocabulary, \
    save_captioner
from lightclip_core.reinforce.teachers import IMAGE_LAYOUT, encode_text
from lightclip_core.reinforce.tower_pretrain import pretrain_tower
from lightclip_core.train.data import PairDecoder, batches
from lightclip_core.train.optim import adamw
from lightclip_core.train.schedule import build_scheduler

log = logging.getLogger(__name__)

WEIGHTS_FILE = WEIGHTS_FILES[0]  # open_clip's first choice in a local-dir
LOG_COLUMNS = ("step", "loss", "clip_loss", "caption_loss", "lr", "logit_scale", "samples_per_s")
INTERPOLATION = "bicubic"
_MAX_LOG_SCALE = math.log(100.0)
CAPTIONER_DIR = "captioner"  # a captioning CLIP's decoder, next to the teacher `model/`
VOCAB_CAPTIONS = 5000  # training captions the captioning decoder's vocabulary is counted over


def trained_captioner(kind: str) -> str | None:
    """The directory (under the teacher stage's output) of the captioner a first teacher of `kind` provides."""
    return {"coca": "model", "captioning_clip": CAPTIONER_DIR}.get(kind)


@dataclass
class TeacherResult:
    model_dir: Path
    metrics: dict[str, float]
    log_path: Path
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, in memory (eval mode)


def model_config(c: CocaTeacherConfig) -> dict[str, Any]:
    """open_clip's model config for a trained teacher of either kind."""
    return coca_model_config(c) if c.kind == "coca" else clip_model_config(c)  # clip, captioning_clip


def clip_model_config(c: CocaTeacherConfig) -> dict[str, Any]:
    """open_clip's CLIP config with a timm image tower (randomly initialised) and open_clip's text transformer."""
    return {
        "embed_dim": c.embed_dim,
        "vision_cfg": {"timm_model_name": dilated_name(c.tower, c.output_stride), "timm_model_pretrained": False,
                       "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": c.image_size},
        "text_cfg": {"context_length": c.context_length, "vocab_size": vocab_size(), "width": c.text_width,
                     "heads": c.text_heads, "layers": c.text_layers},
    }


def coca_model_config(c: CocaTeacherConfig) -> dict[str, Any]:
    """open_clip's model config for `c`, shaped like its `coca_ViT-B-32.json`. The text tokens, the attentional
    pooler's image tokens and the decoder share one width (CocaTeacherConfig checks `text_width == embed_dim`)."""
    grid = c.image_size // c.patch_size
    vocab = vocab_size()
    return {
        "embed_dim": c.embed_dim,
        "vision_cfg": {"image_size": c.image_size, "patch_size": c.patch_size, "width": c.vision_width,
                       "layers": c.vision_layers, "head_width": c.vision_width // c.vision_heads,
                       "attentional_pool": True, "attn_pooler_heads": c.text_heads,
                       "attn_pooler_queries": grid * grid + 1, "output_tokens": True},
        "text_cfg": {"context_length": c.context_length, "vocab_size": vocab, "width": c.text_width,
                     "heads": c.text_heads, "layers": c.text_layers, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": c.context_length, "vocab_size": vocab, "width": c.text_width,
                           "heads": c.text_heads, "layers": c.decoder_layers, "attn_pooler_heads": c.text_heads},
        "custom_text": True,
    }


def preprocess_config(image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` (keys of `open_clip.transform.PreprocessCfg`)."""
    return {"size": image_size, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "interpolation": INTERPOLATION, "resize_mode": "shortest"}


def write_config(directory: Path, model_cfg: dict[str, Any], pp_cfg: dict[str, Any]) -> None:
    write_json_atomic(directory / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": pp_cfg})


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def fresh_build_dir(final: Path) -> Path:
    """A new hidden directory next to `final` (same file system, so the final rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    build = final.parent / f".{final.name}.build-{os.getpid()}-{secrets.token_hex(4)}"
    build.mkdir()
    return build


def create_from_dir(directory: Path, device: torch.device) -> nn.Module:
    """A freshly initialised model from an open_clip local-dir's config (the path a teacher is later loaded by).

    open_clip 3.3 leaves CoCa's decoder vocabulary projection (`text_decoder.text_projection`, `torch.empty`) without
    initialisation: it holds whatever memory it got (NaN under torch's deterministic mode, huge values at times,
    which made the caption loss explode). It gets the initialisation open_clip gives the text tower's projection."""
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False, device=device, output_dict=True)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and getattr(decoder, "text_projection", None) is not None:
        nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    return model


def publish_captioner(model: nn.Module, decoder: CaptionDecoder, c: CocaTeacherConfig, final: Path,
                      mean: Sequence[float], std: Sequence[float]) -> Path:
    """The captioning CLIP's tower trunk and decoder as a captioner directory, swapped in as `final`."""
    captioner = TowerCaptioner(dilated_name(c.tower, c.output_stride), decoder)
    captioner.trunk.load_state_dict(model.visual.trunk.state_dict())
    build = fresh_build_dir(final)
    try:
        save_captioner(captioner, build, preprocess_config(c.image_size, mean, std))
        swap_in(build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return final


def publish_model_dir(model: nn.Module, build: Path, final: Path) -> Path:
    """Add the weights to `build` (which holds the config) and swap it in as `final`."""
    save_weights(model, build / WEIGHTS_FILE)
    swap_in(build, final)
    return final


def build_optimizer(model: nn.Module, c: CocaTeacherConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings (token, positional, class) or the temperature."""
    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "embedding" in name or "cls_emb" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not exempt(n, p)], "weight_decay": c.weight_decay},
              {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0}]
    return adamw(groups, lr=c.lr, betas=(0.9, 0.98), eps=1e-6)


def _step(model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
          decoder: CaptionDecoder | None = None, weights: tuple[float, float] = (1.0, 1.0)) -> tuple:
    if decoder is not None:  # captioning CLIP: one pass of the trunk feeds the pooled embedding and the decoder
        visual = model.visual
        fmap = visual.trunk.forward_features(images)
        image_features = F.normalize(visual.head(visual.trunk.forward_head(fmap)), dim=-1)
        scale = model.logit_scale.exp()
        tokens = trim_padding(tokens)  # exact for the causal text tower and the decoder's masked loss
        clip_loss = loss_fn(image_features, encode_text(model, tokens, normalize=True), scale)
        caption_loss = decoder.loss(tokens, decoder.memory_tokens(fmap))
        return weights[0] * clip_loss + weights[1] * caption_loss, clip_loss, caption_loss, scale
    out = model(images, tokens)
    if isinstance(loss_fn, CoCaLoss):
        clip_loss, caption_loss = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                          out["logit_scale"])
    else:
        clip_loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        caption_loss = torch.zeros_like(clip_loss)
    return clip_loss + caption_loss, clip_loss, caption_loss, out["logit_scale"]


def build_decoder(c: CocaTeacherConfig, model: nn.Module, train_dir: str | os.PathLike) -> CaptionDecoder:
    """The captioning decoder of a captioning CLIP: its vocabulary counted over the first training captions."""
    readable = decoded(iter_raw_samples(shard_refs(train_dir)), decode_caption, SkipTally())  # the stream counts
    captions = itertools.islice(readable, VOCAB_CAPTIONS)
    vocab = caption_vocabulary(captions, c.context_length, c.max_vocab)
    return CaptionDecoder(vocab, model.visual.trunk.num_features, c.text_width, c.text_heads, c.decoder_layers,
                          c.context_length)


def _loader(c: CocaTeacherConfig, train_dir: str | os.PathLike, mean: Sequence[float], std: Sequence[float],
            device: torch.device) -> tuple[torch.utils.data.DataLoader, ShardStream]:
    decoder = PairDecoder(c.image_size, mean, std, INTERPOLATION, c.context_length)
    stream = ShardStream(shard_refs(train_dir), decoder, seed=c.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=c.batch_size, drop_last=True,
                                         pin_memory=device.type == "cuda")
    return loader, stream


def _train_loop(model: nn.Module, c: CocaTeacherConfig, loader: torch.utils.data.DataLoader, stream: ShardStream,
                log_path: Path, sink: MetricSink | None, device: torch.device,
                decoder: CaptionDecoder | None = None, skip_limit: tuple[float, int, str] | None = None
                ) -> list[dict[str, float]]:
    """`c.steps` optimiser steps; one log row per step (CSV, sink, progress bar). `skip_limit` (max fraction, the
    split's size, its name) stops the loop as soon as the samples the stream skipped exceed the limit's share."""
    loss_fn = (CoCaLoss(caption_loss_weight=c.caption_loss_weight, clip_loss_weight=c.clip_loss_weight)
               if c.kind == "coca" else ClipLoss())
    trained = model if decoder is None else nn.ModuleDict({"model": model, "decoder": decoder})
    optimizer = build_optimizer(trained, c)
    scheduler = build_scheduler(optimizer, c.warmup_steps, c.steps, c.schedule)
    rows: list[dict[str, float]] = []
    trained.train()
    if c.lock_tower:  # LiT: the pretrained tower's batch-norm statistics stay as they are
        model.visual.trunk.eval()
    tick = time.perf_counter()
    with open(log_path, "w", newline="") as log_file, tqdm(total=c.steps, desc="teacher", unit="step") as bar:
        writer = csv.DictWriter(log_file, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for step, (_, batch) in enumerate(batches(loader, stream, c.steps), start=1):
            images = batch["images"].to(device, memory_format=IMAGE_LAYOUT)
            loss, clip_loss, caption_loss, scale = _step(model, loss_fn, images,
                                                         batch["tokens"].to(device), decoder,
                                                         (c.clip_loss_weight, c.caption_loss_weight))
            if not torch.isfinite(loss):
                raise RuntimeError(f"teacher loss is {loss.item()} at step {step}; nothing was published")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, _MAX_LOG_SCALE)
            now = time.perf_counter()
            row = {"step": step, "loss": loss.item(), "clip_loss": clip_loss.item(),
                   "caption_loss": caption_loss.item(), "lr": scheduler.get_last_lr()[0],
                   "logit_scale": scale.item(), "samples_per_s": c.batch_size / (now - tick)}
            tick = now
            rows.append(row)
            writer.writerow(row)
            log_file.flush()  # readable while training runs
            if sink is not None:
                sink.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update()
            if skip_limit is not None:
                stream.tally.check_running(*skip_limit)
    trained.eval()
    return rows


def _summary(rows: list[dict[str, float]], batch_size: int, wall: float) -> dict[str, float]:
    tail = rows[-min(len(rows), 20):]
    return {"steps": float(len(rows)), "wall_time_s": wall, "samples_per_s": len(rows) * batch_size / wall,
            **{f"final_{k}": float(np.mean([r[k] for r in tail])) for k in ("loss", "clip_loss", "caption_loss")},
            "final_logit_scale": tail[-1]["logit_scale"]}


def train_coca_teacher(c: CocaTeacherConfig, train_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       mean: Sequence[float], std: Sequence[float], sink: MetricSink | None = None,
                       device: str | torch.device | None = None, name: str = "model",
                       max_skip_fraction: float | None = None) -> TeacherResult:
    """Train the teacher `c` on the shards of `train_dir` for `c.steps` steps; publish `out_dir/<name>/` and log
    `out_dir/<name>_log.csv` (`teacher_log.csv` for the first teacher). Bad samples are skipped and counted (the
    metrics' `skipped/...`); past `max_skip_fraction` of them (default: data.max_skip_fraction's) a DataError, before
    anything is published."""
    if max_skip_fraction is None:
        max_skip_fraction = DataConfig.model_fields["max_skip_fraction"].default
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    final = out_dir / name
    build = fresh_build_dir(final)
    try:
        write_config(build, model_config(c), preprocess_config(c.image_size, mean, std))
        torch.manual_seed(c.seed)
        model = create_from_dir(build, device).to(memory_format=IMAGE_LAYOUT)  # faster CNN steps on a CPU
        pretrained = {}
        if c.pretrain_steps:
            log.info("training the %s teacher %r's tower supervised on %s for %d steps", c.kind, name,
                     ", ".join(c.pretrain_labels), c.pretrain_steps)
            pretrained = pretrain_tower(model.visual.trunk, c, train_dir, mean, std, INTERPOLATION, device,
                                        max_skip_fraction)
        if c.lock_tower:
            model.visual.lock(unlocked_groups=0, freeze_bn_stats=False)  # open_clip's: the trunk's requires_grad off
        decoder = build_decoder(c, model, train_dir).to(device) if c.kind == "captioning_clip" else None
        loader, stream = _loader(c, train_dir, mean, std, device)
        log.info("training the %s teacher %r (%.2fM parameters) for %d steps, batch %d, on %s", c.kind, name,
                 sum(p.numel() for p in model.parameters()) / 1e6, c.steps, c.batch_size, device)
        log_path = out_dir / ("teacher_log.csv" if name == "model" else f"{name}_log.csv")
        started = time.perf_counter()
        source = f"teacher --data {train_dir}"
        rows = _train_loop(model, c, loader, stream, log_path, sink, device, decoder,
                           (max_skip_fraction, read_manifest(train_dir)["num_samples"], source))
        stream.tally.check(max_skip_fraction, source)
        metrics = {**_summary(rows, c.batch_size, time.perf_counter() - started), **stream.tally.metrics(),
                   **pretrained}
        if decoder is not None:
            publish_captioner(model, decoder, c, out_dir / CAPTIONER_DIR, mean, std)
        publish_model_dir(model, build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info("trained the %s teacher: %d steps in %.1f s (%.1f samples/s), final loss %.4f; published %s",
             c.kind, len(rows), metrics["wall_time_s"], metrics["samples_per_s"], metrics["final_loss"], final)
    return TeacherResult(final, metrics, log_path, model)
