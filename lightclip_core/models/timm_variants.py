"""timm towers with a finer last feature map, under names any timm-based loader can create (open_clip's TimmModel).

`<tower>_os16` (or `_os8`) is timm's `<tower>` built with `output_stride=16`: its last stages are dilated instead of
strided, so a 64 px image ends in a 4 x 4 map instead of 2 x 2 (benchmarks/shape_learning.py: a supervised
MobileNetV2 probe learns shape much faster that way on the embedded default). open_clip builds a timm image tower by
name only, so the variant is registered with timm's own model registry under that name, on demand.
"""
from __future__ import annotations

import re

import timm
from timm.models import register_model

_SUFFIX = re.compile(r"^(?P<base>.+)_os(?P<stride>8|16)$")


def dilated_name(tower: str, output_stride: int | None) -> str:
    """The registered name of `tower` at `output_stride` (the tower itself for None or 32)."""
    if output_stride in (None, 32):
        return tower
    name = f"{tower}_os{output_stride}"
    ensure_registered(name)
    return name


def ensure_registered(name: str) -> bool:
    """Register `name` if it is `<timm model>_os8|16` and timm does not know it yet; whether timm knows it now."""
    if timm.is_model(name):
        return True
    match = _SUFFIX.match(name)
    if match is None or not timm.is_model(match["base"]):
        return False
    base, stride = match["base"], int(match["stride"])

    def entrypoint(pretrained: bool = False, **kwargs):
        return timm.create_model(base, pretrained=pretrained, output_stride=stride, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    register_model(entrypoint)
    return True
