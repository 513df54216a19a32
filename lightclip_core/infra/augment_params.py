"""Parameter types of the augmentations dataset reinforcement stores (the `reinforce` section): op pools, crop ranges.

DataCompDR's ``paug.json`` stores RandAugment ops as indices into torchvision's RandAugment op table, so the table's
order is part of the storage format: :data:`RANDAUGMENT_OPS` is that order (``lightclip_core.data.augment`` checks it
against torchvision when imported). An op pool is either ``"all"`` (every op of the table at one magnitude bin:
torchvision's RandAugment, as MobileCLIP stores it) or a mapping from op name to that op's magnitude bin, kept in
table order so that the same pool always validates to the same value (and the same fingerprint).
"""
from __future__ import annotations

import numbers
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator

RANDAUGMENT_OPS: tuple[str, ...] = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                                    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
                                    "Equalize")
MAGNITUDE_BINS = 31  # torchvision's RandAugment default: magnitudes are bins 0..30 of each op's range
# The default pool: ops that keep a caption naming colour, shape, size and position true (measured by
# benchmarks/view_consistency.py), in table order. No Solarize, Equalize or AutoContrast (they recolour the shape),
# geometric ops at about half of MobileCLIP's magnitude 9 (rotation 5 degrees, shear 0.05, translation 6% of the
# side), Brightness at 5, the other colour-keeping ops at 9.
CAPTION_SAFE_OPS: dict[str, int] = {"ShearX": 5, "ShearY": 5, "TranslateX": 4, "TranslateY": 4, "Rotate": 5,
                                    "Brightness": 5, "Color": 9, "Contrast": 9, "Sharpness": 9, "Posterize": 9}


def _op_pool(value: Any) -> Any:
    allowed = f"`all`, or a mapping {{op: magnitude bin 0..{MAGNITUDE_BINS - 1}}} over {', '.join(RANDAUGMENT_OPS)}"
    if value == "all":
        return value
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected {allowed} (at least one op; rand_augment_ops: 0 skips RandAugment)")
    for name, bin_ in value.items():
        if name not in RANDAUGMENT_OPS:
            raise ValueError(f"unknown op {name!r}; allowed: {allowed}")
        if not isinstance(bin_, numbers.Integral) or isinstance(bin_, bool) or not 0 <= bin_ < MAGNITUDE_BINS:
            raise ValueError(f"op {name}: magnitude bin {bin_!r} is not an int in [0, {MAGNITUDE_BINS - 1}]")
    return {name: int(value[name]) for name in RANDAUGMENT_OPS if name in value}


def _ordered(r: tuple[float, float]) -> tuple[float, float]:
    if not 0 < r[0] <= r[1]:
        raise ValueError(f"expected 0 < low <= high, got {list(r)}")
    return r


OpPool = Annotated[Literal["all"] | dict[str, int], BeforeValidator(_op_pool)]
OrderedRange = Annotated[tuple[float, float], AfterValidator(_ordered)]
