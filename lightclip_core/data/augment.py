"""Replayable augmentations for dataset reinforcement (MobileCLIP), stored in DataCompDR's compressed format.

MobileCLIP's dataset reinforcement keeps, per sample, several augmentation parameter sets so that training can replay
exactly the augmented view the teacher embedded. One set is a RandomResizedCrop followed by RandAugment, and its
stored ("compressed") form is the one published with DataCompDR (apple/ml-mobileclip, ``training/dr/transforms.py``)::

    [[i, j, h, w], [[op_index, magnitude], [op_index, magnitude]]]

``(i, j, h, w)`` = (top, left, height, width) of the crop box in ORIGINAL-image pixels (torchvision's
``RandomResizedCrop.get_params`` convention). ``op_index`` indexes :data:`OP_NAMES` (torchvision's RandAugment
augmentation-space order) and ``magnitude`` is the signed value handed to the op: torchvision's
``_augmentation_space(num_bins, (size, size))`` entry at the magnitude bin, negated with probability 1/2 for signed
ops, 0.0 for ops without one; translations are in pixels of the resolution the op ran at. The second element is
``null`` when RandAugment was skipped.

RandAugment draws each op uniformly from an op pool: torchvision's whole table at one magnitude (``ops=None`` or
``"all"``: MobileCLIP's RandAugment) or the ops the ``reinforce.ops`` parameter names, each at its own magnitude bin.
Either way the stored index is the op's index in :data:`OP_NAMES`, so replay does not need to know the pool.

Sampling draws from an explicit ``torch.Generator`` in the same order as torchvision's ``RandomResizedCrop`` followed
by ``RandAugment`` draw from the global RNG, so the global RNG is never touched and a generator seeded like the global
RNG reproduces torchvision's pipeline exactly.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import RandAugment, _apply_op

from lightclip_core.data.transforms import _INTERPOLATION, to_rgb
from lightclip_core.infra.augment_params import RANDAUGMENT_OPS

OP_NAMES: list[str] = list(RANDAUGMENT_OPS)
_TRANSLATE_OPS = frozenset({OP_NAMES.index("TranslateX"), OP_NAMES.index("TranslateY")})
# The ops that move pixels (what they do to an image they do to its masks); the others change pixel values only.
GEOMETRIC_OPS = frozenset(OP_NAMES.index(n) for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))

if list(RandAugment()._augmentation_space(31, (64, 64))) != OP_NAMES:  # the stored op indices depend on this order
    raise ImportError("torchvision's RandAugment op order differs from DataCompDR's OP_NAMES")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _parse_box(box: Any) -> tuple[int, int, int, int]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"AugParams box must be a list [i, j, h, w] of 4 ints, got {box!r}")
    if not all(_is_int(v) for v in box):
        raise ValueError(f"AugParams box values must be ints, got {box!r}")
    i, j, h, w = (int(v) for v in box)
    if i < 0 or j < 0 or h <= 0 or w <= 0:
        raise ValueError(f"AugParams box needs i, j >= 0 and h, w > 0, got {box!r}")
    return i, j, h, w


def _parse_op(op: Any) -> tuple[int, float]:
    if not isinstance(op, (list, tuple)) or len(op) != 2:
        raise ValueError(f"AugParams op must be a pair [op_index, magnitude], got {op!r}")
    index, magnitude = op
    if not _is_int(index) or not 0 <= index < len(OP_NAMES):
        raise ValueError(f"AugParams op index must be an int in [0, {len(OP_NAMES)}), got {index!r}")
    if not _is_real(magnitude):
        raise ValueError(f"AugParams op magnitude must be a finite number, got {magnitude!r}")
    return int(index), float(magnitude)


@dataclass(frozen=True)
class AugParams:
    """One augmentation parameter set: crop box (i, j, h, w) in original pixels, RandAugment ops or None (skipped)."""

    box: tuple[int, int, int, int]
    ops: tuple[tuple[int, float], ...] | None

    def to_json(self) -> list:
        """The DataCompDR compressed form, plain Python ints and floats."""
        ops = None if self.ops is None else [[int(k), float(m)] for k, m in self.ops]
        return [[int(v) for v in self.box], ops]

    @classmethod
    def from_json(cls, obj: Any) -> AugParams:
        """Parse the compressed form (lists or tuples); malformed input raises ValueError."""
        if not isinstance(obj, (list, tuple)) or len(obj) != 2:
            raise ValueError(f"AugParams entry must be a list [box, ops] of length 2, got {obj!r}")
        box, ops = obj
        if ops is not None and not isinstance(ops, (list, tuple)):
            raise ValueError(f"AugParams ops must be a list of [op_index, magnitude] pairs or null, got {ops!r}")
        return cls(_parse_box(box), None if ops is None else tuple(_parse_op(op) for op in ops))


def sample_generator(seed: int, key: str, index: int) -> torch.Generator:
    """A generator determined by (dataset seed, sample key, augmentation index) only, not by processing order."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=generator).item())


def sample_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
               generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (same draws, same central-crop fallback) on ``generator``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect_ratio = math.exp(_uniform(float(log_ratio[0]), float(log_ratio[1]), generator))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = _randint(height - h + 1, generator)
            return i, _randint(width - w + 1, generator), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _op_bins(ops: Mapping[str, int] | Sequence[str] | None, magnitude: int, num_bins: int) -> dict[str, int]:
    """{op name: magnitude bin} of a pool given as None (every op), a list of names or a mapping."""
    if isinstance(ops, str) and ops != "all":
        raise ValueError(f"ops must be None, 'all', a list of op names or a mapping, got {ops!r}")
    bins = dict.fromkeys(OP_NAMES if ops is None or ops == "all" else ops, magnitude)
    bins.update(ops if isinstance(ops, Mapping) else {})
    unknown = sorted(set(bins) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {OP_NAMES}")
    if not bins:
        raise ValueError("ops is empty: name at least one op (num_ops=0 skips RandAugment)")
    for name, bin_ in bins.items():
        if not _is_int(bin_) or not 0 <= bin_ < num_bins:
            raise ValueError(f"magnitude bin of {name} must be an int in [0, {num_bins}), got {bin_!r}")
    return bins


class ReplayableAugment:
    """RandomResizedCrop + RandAugment whose random draws come from a generator and are returned as AugParams.

    ``ops`` is the pool RandAugment draws from: None (or ``"all"``) is torchvision's whole table at ``magnitude``
    (torchvision's RandAugment, draw for draw), a list of op names takes each at ``magnitude``, a mapping
    {op name: magnitude bin} gives each op its own bin. Ops are drawn uniformly from the pool.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, interpolation: str = "bilinear",
                 ops: Mapping[str, int] | Sequence[str] | None = None):
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, {num_magnitude_bins}), got {magnitude}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        self.interpolation = _INTERPOLATION[interpolation]
        self.op_bins = _op_bins(ops, magnitude, num_magnitude_bins)
        space = RandAugment()._augmentation_space(num_magnitude_bins, (size, size))
        # (op index, magnitude, signed) in table order, whatever order the pool was given in
        self._pool = [(index, float(m[self.op_bins[name]].item()) if m.ndim > 0 else 0.0, signed)
                      for index, (name, (m, signed)) in enumerate(space.items()) if name in self.op_bins]

    def sample(self, image: Image.Image, generator: torch.Generator) -> AugParams:
        """Draw a crop box (original pixels) and ``num_ops`` ops (magnitudes for the size x size output)."""
        box = sample_box(image.width, image.height, self.scale, self.ratio, generator)
        ops = []
        for _ in range(self.num_ops):
            index, value, signed = self._pool[_randint(len(self._pool), generator)]
            if signed and _randint(2, generator):
                value = -value
            ops.append((index, value))
        return AugParams(box, tuple(ops))

    def apply(self, image: Image.Image, params: AugParams, size: int | None = None,
              reference_size: int | None = None) -> Image.Image:
        """Replay ``params``; translations are rescaled by size/reference_size when both are given."""
        return self._replay(to_rgb(image), params, size, reference_size, geometric_only=False)

    def apply_geometry(self, mask: Image.Image, params: AugParams, size: int | None = None,
                       reference_size: int | None = None) -> Image.Image:
        """Replay only what moves pixels (the crop and :data:`GEOMETRIC_OPS`) on a one-channel image such as an
        object's mask, so that it stays aligned with ``apply``'s view; pixels moved in from outside are 0."""
        return self._replay(mask, params, size, reference_size, geometric_only=True)

    def _replay(self, image: Image.Image, params: AugParams, size: int | None, reference_size: int | None,
                geometric_only: bool) -> Image.Image:
        size = self.size if size is None else size
        i, j, h, w = params.box
        if i + h > image.height or j + w > image.width:
            raise ValueError(f"crop box {params.box} does not fit a {image.width}x{image.height} image")
        out = F.resized_crop(image, i, j, h, w, [size, size], self.interpolation, antialias=True)
        factor = size / reference_size if reference_size is not None and reference_size != size else 1.0
        for index, value in params.ops or ():
            if geometric_only and index not in GEOMETRIC_OPS:
                continue
            value = value * factor if index in _TRANSLATE_OPS else value
            out = _apply_op(out, OP_NAMES[index], value, interpolation=self.interpolation, fill=None)
        return out

    def __call__(self, image: Image.Image, generator: torch.Generator) -> tuple[Image.Image, AugParams]:
        params = self.sample(image, generator)
        return self.apply(image, params), params
