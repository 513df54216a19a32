"""A small, fast captioner for the embedded default: a transformer decoder over a CNN's last feature map.

open_clip's CoCa needs a ViT image tower (a timm tower does not work inside it), and on the embedded default a small
ViT trained for minutes on a CPU does not learn shape, so its captions name the right shape no more often than chance.
This captioner is trained jointly with a CLIP teacher whose image tower is a CNN (`teacher.train.kind:
captioning_clip`): the decoder cross-attends to the tower's last feature map, so the captioning loss teaches the
shared tower what the captions name. Its output layer covers only the tokens of the training captions (a few hundred
here, at most `max_vocab`), which makes a CPU step and a sampling step cheap.

Saved as a directory (`captioner_config.json` + `captioner.safetensors`: the image trunk, the decoder, the token
table) and loaded by :class:`lightclip_core.reinforce.captioner.Captioner` like a CoCa.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lightclip_core.infra.storage import atomic_path, write_json_atomic
from lightclip_core.models.timm_variants import ensure_registered
from lightclip_core.models.tokenizer import special_token_ids, tokenize, vocab_size

CONFIG_FILE = "captioner_config.json"
WEIGHTS_FILE = "captioner.safetensors"
UNK = 0  # the reduced vocabulary's index for a token no training caption had


def caption_vocabulary(captions: Iterable[str], context_length: int, max_vocab: int) -> list[int]:
    """Tokenizer ids of the reduced vocabulary: unknown (a placeholder), start and end of text, then the most frequent
    tokens of `captions`, at most `max_vocab` in all."""
    special = special_token_ids()
    counts: Counter[int] = Counter()
    for caption in captions:
        counts.update(int(t) for t in tokenize(caption, context_length)[0] if int(t) not in (0, *special.values()))
    common = [token for token, _ in counts.most_common(max(0, max_vocab - 3))]
    return [-1, special["sot"], special["eot"], *sorted(common)]


class CaptionDecoder(nn.Module):
    """Next-token logits over the reduced vocabulary, given the caption so far and an image feature map."""

    def __init__(self, vocab: Sequence[int], image_channels: int, width: int = 256, heads: int = 4, layers: int = 2,
                 context_length: int = 20):
        super().__init__()
        self.vocab, self.width, self.heads, self.layers = list(vocab), width, heads, layers
        self.context_length = context_length
        table = torch.full((vocab_size(),), UNK, dtype=torch.long)  # tokenizer id -> reduced index
        for index, token in enumerate(self.vocab):
            if token >= 0:
                table[token] = index
        self.register_buffer("to_reduced", table, persistent=False)
        self.register_buffer("to_token", torch.tensor([max(t, 0) for t in self.vocab]), persistent=False)
        self.embed = nn.Embedding(len(self.vocab), width)
        self.position = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.memory = nn.Linear(image_channels, width)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(self.vocab))

    def memory_tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, H*W, width]`: what the decoder attends to."""
        return self.memory(feature_map.flatten(2).transpose(1, 2))

    def forward(self, reduced: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`[B, L, V]` logits of the token after every prefix of `reduced` `[B, L]` (reduced ids)."""
        length = reduced.shape[1]
        x = self.embed(reduced) + self.position[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        return self.head(self.norm(self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)))

    def loss(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every next token up to and including end-of-text (tokenizer ids `[B, L]`, zero-padded);
        tokens outside the vocabulary are not predicted."""
        tokens = tokens[:, :self.context_length]
        eot = special_token_ids()["eot"]
        ended = (tokens == eot).long().cumsum(1) - (tokens == eot).long()  # 1 after the end-of-text token
        reduced = self.to_reduced[tokens]
        logits = self(reduced[:, :-1], memory)
        target = reduced[:, 1:].masked_fill((ended[:, 1:] > 0) | (reduced[:, 1:] == UNK), -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


class TowerCaptioner(nn.Module):
    """The image trunk (timm, no head) and the decoder: what a captioner directory holds."""

    def __init__(self, tower: str, decoder: CaptionDecoder):
        super().__init__()
        ensure_registered(tower)
        self.tower = tower
        self.trunk = timm.create_model(tower, pretrained=False, num_classes=0, global_pool="")
        self.decoder = decoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder.memory_tokens(self.trunk.forward_features(images))

    def next_reduced_logits(self, prefix: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`[N, len(vocab)]` logits over the reduced vocabulary (-inf at the placeholder) of the token after `prefix`
        (tokenizer ids); `decoder.to_token` maps an index to its tokenizer id. Sampling here, not over the
        tokenizer's 49408 ids, is what makes a caption cheap."""
        reduced = self.decoder(self.decoder.to_reduced[prefix], memory)[:, -1]
        reduced[:, UNK] = float("-inf")
        return reduced

    def next_logits(self, prefix: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`[N, 49408]` logits (over tokenizer ids, -inf outside the vocabulary) of the token after `prefix`
        (tokenizer ids)."""
        reduced = self.next_reduced_logits(prefix, memory)
        out = torch.full((reduced.shape[0], vocab_size()), float("-inf"), dtype=reduced.dtype, device=reduced.device)
        return out.index_copy_(1, self.decoder.to_token[1:], reduced[:, 1:])


def save_captioner(captioner: TowerCaptioner, directory: Path, preprocess: dict[str, Any]) -> None:
    d = captioner.decoder
    directory.mkdir(parents=True, exist_ok=True)
    config = {"tower": captioner.tower, "vocab": d.vocab, "image_channels": d.memory.in_features, "width": d.width,
              "heads": d.heads, "layers": d.layers, "context_length": d.context_length, "preprocess": preprocess}
    state = {k: v.detach().cpu().contiguous() for k, v in captioner.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(directory / CONFIG_FILE, config)


def is_captioner_dir(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def load_captioner(directory: Path, device: torch.device) -> tuple[TowerCaptioner, dict[str, Any]]:
    """(the captioner in eval mode, its preprocessing: size, mean, std, interpolation)."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    decoder = CaptionDecoder(config["vocab"], config["image_channels"], config["width"], config["heads"],
                             config["layers"], config["context_length"])
    model = TowerCaptioner(config["tower"], decoder)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.to(device).eval(), config["preprocess"]
