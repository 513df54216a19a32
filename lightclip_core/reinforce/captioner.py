"""Synthetic captions from an open_clip CoCa model by nucleus (top-p) sampling.

open_clip's own `CoCa.generate` needs transformers' generation utilities (missing from transformers 5.x), so the
sampling loop lives here; it drives the model's own forward pass (`model(None, prefix, image_latent=...,
image_embs=..., output_labels=False)`, what `CoCa.generate` uses for its top-p path), projecting only the last
position onto the vocabulary.
Images are encoded once and their embeddings repeated for every caption; finished sequences drop out of the batch.
A caption is the decoded text up to end-of-text, cut at its first period.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from lightclip_core.config import TeacherSpec
from lightclip_core.data.transforms import image_transform
from lightclip_core.models.open_clip_arch import LOCAL_DIR
from lightclip_core.models.tokenizer import get_tokenizer
from lightclip_core.reinforce.caption_decoder import TowerCaptioner, is_captioner_dir, load_captioner
from lightclip_core.reinforce.teachers import (IMAGE_LAYOUT, TeacherLoadError, describe_spec, eval_transform,
                                               load_model, load_tokenizer, resolve_spec)

log = logging.getLogger(__name__)

_SPECIAL_TEXT = ("<start_of_text>", "<end_of_text>")


def _nucleus_of_sorted(sorted_logits: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep-mask over logits sorted in descending order: a token stays while the mass of the strictly more probable
    tokens is below `top_p` (so the most probable token always stays)."""
    probs = (sorted_logits - log_norm).exp()
    return probs.cumsum(dim=-1) - probs < top_p


def top_p_filter(logits: torch.Tensor, top_p: float, candidates: int = 512) -> torch.Tensor:
    """`logits` with every token outside the nucleus set to -inf: per row, the smallest set of most probable tokens
    whose probability mass reaches `top_p`. The most probable token is always kept; `top_p >= 1` keeps all.

    Exact and cheap: the nucleus is looked for among the `candidates` most probable tokens (a top-k, not a sort of
    the whole vocabulary); only rows whose top `candidates` hold less than `top_p` of the mass are sorted in full."""
    if top_p >= 1.0:
        return logits
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    top, order = logits.topk(min(candidates, logits.shape[-1]), dim=-1)
    keep = _nucleus_of_sorted(top, log_norm, top_p)
    out = torch.full_like(logits, float("-inf")).scatter(-1, order, top.masked_fill(~keep, float("-inf")))
    wide = (top - log_norm).exp().sum(dim=-1) < top_p  # the nucleus reaches beyond the candidates
    if bool(wide.any()):
        rows = logits[wide]
        sorted_logits, full_order = torch.sort(rows, dim=-1, descending=True)
        keep_all = _nucleus_of_sorted(sorted_logits, log_norm[wide], top_p)
        out[wide] = torch.full_like(rows, float("-inf")).scatter(
            -1, full_order, sorted_logits.masked_fill(~keep_all, float("-inf")))
    return out


def next_token_logits(model: nn.Module, prefix: torch.Tensor, image_latent: torch.Tensor,
                      image_embs: torch.Tensor) -> torch.Tensor:
    """`[N, vocab]` logits of the token after `prefix` `[N, L]`, given the images' CoCa embeddings.

    The decoder's vocabulary projection is applied to the last position only: the model's forward runs with the
    projection detached and returns hidden states, and only their last row is projected (the projection over every
    position of the prefix costs more than the rest of the decoder at a 49408-token vocabulary)."""
    decoder = model.text_decoder
    projection = decoder.text_projection
    decoder.text_projection = None
    try:
        out = model(None, prefix, image_latent=image_latent, image_embs=image_embs, output_labels=False)
    finally:
        decoder.text_projection = projection
    last = out["logits"][:, -1]
    return last @ projection if projection is not None else last


def sample_next(logits: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: temperature, then the nucleus, then a draw from `generator` (on its own device)."""
    filtered = top_p_filter(logits.float() / temperature, top_p)
    cdf = F.softmax(filtered, dim=-1).cumsum(dim=-1).to(generator.device)
    # inverse-CDF sampling: torch.multinomial over a 49408-token vocabulary costs more than the decoder step itself
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    return picked.squeeze(1).to(logits.device)


def sample_sequences(next_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int,
                     device: torch.device, sot: int, eot: int, max_tokens: int, top_p: float, temperature: float,
                     generator: torch.Generator, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`[N, 1 + <= max_tokens]` token ids: start-of-text, then sampled tokens until end-of-text (rows that have
    finished are padded with end-of-text) or `max_tokens`. `next_logits(prefixes, rows)` gives the `[len(rows),
    vocab]` logits of the next token of those rows; over a reduced vocabulary when `token_ids` maps its indices to
    tokenizer ids."""
    out = torch.full((n, 1), sot, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=out.device)
    for _ in range(max_tokens):
        active = (~done).nonzero().squeeze(1)
        logits = next_logits(out[active], active)
        column = torch.full((n,), eot, dtype=torch.long, device=out.device)
        picked = sample_next(logits, top_p, temperature, generator)
        column[active] = token_ids[picked] if token_ids is not None else picked
        out = torch.cat([out, column[:, None]], dim=1)
        done |= column == eot
        if bool(done.all()):
            break
    return out


def clean_caption(text: str) -> str:
    """Special-token text removed, cut at the first period, whitespace collapsed."""
    for special in _SPECIAL_TEXT:
        text = text.replace(special, " ")
    return " ".join(text.split(".", 1)[0].split())


class Captioner:
    """An open_clip CoCa model, or a captioning CLIP's decoder (`caption_decoder`), generating `num_captions`
    captions per image."""

    def __init__(self, spec: TeacherSpec, cache_dir: str | os.PathLike, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        local = Path(resolve_spec(spec, cache_dir)[0].removeprefix(LOCAL_DIR))
        self.decoder_model: TowerCaptioner | None = None
        if spec.model.startswith(LOCAL_DIR) and is_captioner_dir(local):
            self._load_decoder(local)
            return
        loaded = load_model(spec, cache_dir, self.device)
        if not isinstance(loaded.model, open_clip.CoCa):
            raise TeacherLoadError(f"{describe_spec(spec)} cannot caption: it is a {type(loaded.model).__name__}, "
                                   "not an open_clip CoCa model")
        self.model = loaded.model
        self.image_size = loaded.image_size
        self.transform = eval_transform(loaded)
        self.tokenizer = load_tokenizer(spec, loaded.name)
        if not hasattr(self.tokenizer, "decode"):
            raise TeacherLoadError(f"{describe_spec(spec)}: its tokenizer "
                                   f"{type(self.tokenizer).__name__} cannot decode")
        self.sot = int(getattr(self.tokenizer, "sot_token_id", 49406))
        self.eot = int(getattr(self.tokenizer, "eot_token_id", 49407))
        # the text tower has positions for `context_length` tokens, the decoder's causal mask as many
        self.max_length = min(int(self.model.text.context_length), int(self.model.context_length))

    def _load_decoder(self, directory: Path) -> None:
        self.decoder_model, pp = load_captioner(directory, self.device)
        self.decoder_model.requires_grad_(False)
        self.decoder_model.trunk.to(memory_format=IMAGE_LAYOUT)
        self.image_size = int(pp["size"])
        self.transform = image_transform(self.image_size, pp["mean"], pp["std"], pp["interpolation"])
        self.max_length = self.decoder_model.decoder.context_length
        self.tokenizer = get_tokenizer(self.max_length)
        self.sot, self.eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        log.info("loaded the captioning decoder %s: image size %d", directory, self.image_size)

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image as the captioner reads it (resize the short side, centre-crop, normalise)."""
        return self.transform(image)

    def decode(self, tokens: torch.Tensor) -> str:
        ids = tokens.tolist()
        ids = ids[:ids.index(self.eot)] if self.eot in ids else ids
        return clean_caption(self.tokenizer.decode([t for t in ids if t != self.sot]))

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, num_captions: int, top_p: float, temperature: float, max_tokens: int,
                 generator: torch.Generator) -> list[list[str]]:
        """`num_captions` captions for each preprocessed image of `[B, 3, H, W]`, in image order."""
        if num_captions < 1 or max_tokens < 1:
            raise ValueError(f"num_captions={num_captions} and max_tokens={max_tokens} must be >= 1")
        steps = min(max_tokens, self.max_length - 1)
        if steps < max_tokens:
            log.debug("max_tokens=%d cut to %d (the model's context length)", max_tokens, steps)
        n = images.shape[0] * num_captions
        token_ids = None
        if self.decoder_model is not None:
            memory = self.decoder_model.encode(images.to(self.device, memory_format=IMAGE_LAYOUT))
            memory = memory.repeat_interleave(num_captions, dim=0)
            step = lambda prefix, rows: self.decoder_model.next_reduced_logits(prefix, memory[rows])  # noqa: E731
            token_ids = self.decoder_model.decoder.to_token
        else:
            latent, embs = self.model._encode_image(images.to(self.device))
            latent = latent.repeat_interleave(num_captions, dim=0)
            embs = embs.repeat_interleave(num_captions, dim=0)
            step = lambda prefix, rows: next_token_logits(self.model, prefix, latent[rows], embs[rows])  # noqa: E731
        tokens = sample_sequences(step, n, self.device, self.sot, self.eot, steps, top_p, temperature, generator,
                                  token_ids)
        texts = [self.decode(row) for row in tokens.cpu()]
        return [texts[i * num_captions:(i + 1) * num_captions] for i in range(images.shape[0])]
