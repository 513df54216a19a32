"""Image preprocessing shared by training, evaluation and the exported model (torchvision transforms)."""
from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def image_transform(size: int, mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bilinear") -> T.Compose:
    """Resize the short side to `size`, centre-crop a square, scale to [0, 1], normalise with mean/std."""
    return T.Compose([
        T.Resize(size, interpolation=_INTERPOLATION[interpolation], antialias=True),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
