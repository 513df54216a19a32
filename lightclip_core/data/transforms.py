"""Image preprocessing shared by training, evaluation and the exported model (torchvision transforms)."""
from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def to_rgb(image):
    """Grayscale, palette and RGBA images would otherwise give tensors with the wrong channel count."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def image_transform(size: int, mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bilinear") -> T.Compose:
    """PIL image -> `[3, size, size]` tensor: RGB, resize the short side, centre-crop, scale to [0, 1], normalise."""
    return T.Compose([
        T.Lambda(to_rgb),
        T.Resize(size, interpolation=_INTERPOLATION[interpolation], antialias=True),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
