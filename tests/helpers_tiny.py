"""The tiny parameters the end-to-end tests (DVC, kfp.local) run the whole pipeline with, in about a minute."""
from __future__ import annotations

TINY = {
    "data": {"samples_per_shard": 128, "synthetic": {"num_train": 256, "num_val": 32, "num_test": 64,
                                                     "image_size": 32}},
    "model": {"embed_dim": 32, "image": {"size": 32}, "text": {"width": 64, "heads": 2, "layers": 2}},
    "objectives": {"mlm": {"fusion": [{"text_layer": 0, "image_stride": 16}, {"text_layer": 1, "image_stride": 32}]}},
    "train": {"batch_size": 32, "max_steps": 6, "warmup_steps": 2, "checkpoint_every": 3, "workers": 0},
    "evaluate": {"batch_size": 64},
    # the CoCa teacher (also the captioner) and a ResNet-18 CLIP second, from scratch: LiT's pretraining is
    # tests/test_tower_pretrain.py's
    "teacher": {"train": {"kind": "coca", "tower": None, "pretrain_steps": 0, "lock_tower": False, "embed_dim": 64, "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 1,
                          "vision_heads": 2, "text_width": 64, "text_layers": 1, "text_heads": 2,
                          "decoder_layers": 1, "context_length": 16, "steps": 4, "batch_size": 32},
                "gate": {"min_colour_shape": None, "min_caption_colour": None, "min_caption_shape": None},
                "second": {"kind": "clip", "tower": "resnet18", "embed_dim": 32, "image_size": 32, "text_width": 32, "text_layers": 1, "text_heads": 2,
                           "context_length": 16, "steps": 3, "batch_size": 32}},
    "reinforce": {"num_augmentations": 2, "num_captions": 1, "max_caption_tokens": 6, "batch_size": 64},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out
