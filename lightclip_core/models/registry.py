"""Named model presets, in the spirit of timm's `@register_model`: one function per variant returns the values of
the `model` section it stands for. `model.preset: <name>` in params.yaml fills every model field left at null.

Presets are plain values: this module imports nothing from the package (models/config.py reads it).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

PresetFn = Callable[[], dict[str, Any]]
_PRESETS: dict[str, PresetFn] = {}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Register the decorated function's values under `name`."""

    def register(fn: PresetFn) -> PresetFn:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is registered twice")
        _PRESETS[name] = fn
        return fn

    return register


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def is_preset(name: str) -> bool:
    return name in _PRESETS


def preset_values(name: str) -> dict[str, Any]:
    """A fresh copy of the preset's `model` values (nested like params.yaml)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(list_presets())}")
    return _PRESETS[name]()


# ------------------------------------------------------------------------------------------------ LightCLIP
def _lightclip(tower: str) -> dict[str, Any]:
    # LightCLIP (arXiv 2312.00674) shortens CLIP's 12-layer text transformer; the paper leaves the depth open,
    # we take half (6 layers) at CLIP's width. Causal attention and CLIP's preprocessing, as in CLIP.
    return {
        "embed_dim": 512,
        "image": {"tower": tower, "size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"},
        "text": {"kind": "transformer", "context_length": 77, "width": 512, "heads": 8, "layers": 6,
                 "mlp_ratio": 4.0, "causal": True},
    }


@register_preset("lightclip-mnv2-s")
def lightclip_mnv2_s() -> dict[str, Any]:
    """LightCLIP with a MobileNetV2 image tower and a 6-layer text transformer."""
    return _lightclip("mobilenetv2_100")


@register_preset("lightclip-effb0-s")
def lightclip_effb0_s() -> dict[str, Any]:
    """LightCLIP with an EfficientNet-B0 image tower and a 6-layer text transformer."""
    return _lightclip("efficientnet_b0")


# ----------------------------------------------------------------------------------------------- MobileCLIP
def _mobileclip(tower: str, text: dict[str, Any]) -> dict[str, Any]:
    # MobileCLIP (arXiv 2311.17049): MCi towers see 256 px images without mean/std normalisation, resized with
    # bilinear interpolation (open_clip's MobileCLIP preprocessing); bidirectional text attention.
    return {
        "embed_dim": 512,
        "image": {"tower": tower, "size": 256, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                  "interpolation": "bilinear"},
        "text": {"context_length": 77, "width": 512, "heads": 8, "mlp_ratio": 4.0, "causal": False, **text},
    }


@register_preset("mobileclip-s0")
def mobileclip_s0() -> dict[str, Any]:
    """MobileCLIP-S0: MCi0 image tower; MCt text tower (RepMixer block, 4 transformer layers, RepMixer block)."""
    return _mobileclip("fastvit_mci0", {"kind": "mct", "layers": 4, "mixer_kernel": 11})


@register_preset("mobileclip-s1")
def mobileclip_s1() -> dict[str, Any]:
    """MobileCLIP-S1: MCi1 image tower; 12-layer text transformer."""
    return _mobileclip("fastvit_mci1", {"kind": "transformer", "layers": 12})


@register_preset("mobileclip-s2")
def mobileclip_s2() -> dict[str, Any]:
    """MobileCLIP-S2: MCi2 image tower; 12-layer text transformer."""
    return _mobileclip("fastvit_mci2", {"kind": "transformer", "layers": 12})
