"""The embedded default dataset: coloured shapes on backgrounds with captions from a small grammar (DESIGN.md 4).

Every sample is a function of (seed, split, index) alone: its random numbers come from a numpy generator seeded
with a SeedSequence of those three, so splits are independent, any sample can be regenerated on its own and the
same seed gives byte-identical shards. Colour and shape are balanced: each block of
``len(COLOURS) * len(SHAPES)`` consecutive samples holds every colour-shape pair once, in a shuffled order.

Only the training split gets noisy captions (one attribute replaced by a wrong value, as in web data); the
held-out splits are the benchmark, so their captions are true. Test samples carry several different captions.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from lightclip_core.config import DataConfig
from lightclip_core.data.shards import Sample

SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_BLOCK_STREAM = 7  # separates the per-block permutation stream from the per-sample streams

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

# Geometry as fractions of the image side. Anchors are 0.25 apart and jitter is at most 0.03, so the nearest
# anchor to a shape's centre is always its label; a large shape at a side anchor stays inside its half.
POSITION_ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                    "centre": (0.5, 0.5)}
POSITION_JITTER = 0.03
RADIUS_RANGE = {"small": (0.09, 0.12), "large": (0.18, 0.21)}
COLOUR_JITTER = 12
MIN_CONTRAST = 150.0  # RGB distance between the shape colour and the background base colour
BACKGROUND_GREY_MIX = 0.7  # backgrounds are muted so that the shape is the most colourful thing in the image
GRADIENT_AMPLITUDE = 12.0
NOISE_AMPLITUDE = 5
NOISE_BLOCK = 2  # noise in 2x2 blocks: the background is textured but PNG still compresses it to ~2 kB
PNG_COMPRESS_LEVEL = 3
JPEG_QUALITY = 95
TEST_CAPTIONS = 2

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "in the left part of the image", "on the left-hand side"),
    "right": ("on the right", "at the right side", "in the right part of the image", "on the right-hand side"),
    "top": ("at the top", "near the top", "in the upper part of the image", "at the top of the picture"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part of the image", "at the bottom of the picture"),
    "centre": ("in the centre", "in the middle", "at the center of the image", "in the middle of the picture"),
}
# {a} is a noun phrase with an indefinite article, {the} the same with "the", {pos} a position phrase.
TEMPLATES_WITH_POSITION = (
    "{a} {pos}.",
    "a photo of {a} {pos}.",
    "an image showing {a} {pos}.",
    "there is {a} {pos}.",
    "{pos}, there is {a}.",
    "{a} drawn {pos} on a plain background.",
    "{the} is {pos}.",
)
TEMPLATES_WITHOUT_POSITION = (
    "{a}.",
    "a photo of {a}.",
    "a drawing of {a} on a plain background.",
    "an image showing {a}.",
    "there is {a} in the picture.",
    "a simple picture of {a}.",
)
SIZE_MENTION_PROBABILITY = 0.5
POSITION_MENTION_PROBABILITY = 0.6

# Zero-shot prompts avoid "a {}" where the class may start with a vowel ("orange"): "the" fits every class.
TASK_TEMPLATES = {
    "shape": ("a photo of a {}.", "a {} on a plain background.", "there is a {} in the picture.",
              "a drawing of a {}."),
    "colour": ("a photo of the {} shape.", "the {} shape.", "a drawing of something {}.",
               "the shape is {}."),
    "colour_shape": ("a photo of the {}.", "the {} in the picture.", "a drawing of the {}.",
                     "there is the {} on a plain background."),
}


@dataclass(frozen=True)
class Attributes:
    """The true labels of one sample."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def colour_shape(self) -> str:
        return f"{self.colour} {self.shape}"


def colour_shape_classes() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def synthetic_tasks() -> dict[str, dict[str, Any]]:
    """The zero-shot classification tasks of the manifest; class names are the words the captions use."""
    classes = {"shape": list(SHAPES), "colour": list(COLOURS), "colour_shape": colour_shape_classes()}
    return {name: {"label_key": name, "classes": classes[name], "templates": list(TASK_TEMPLATES[name])}
            for name in classes}


def split_sizes(cfg: DataConfig) -> dict[str, int]:
    syn = cfg.synthetic
    return {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}


def sample_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], stream, index]))


@lru_cache(maxsize=64)
def _colour_shape_block(seed: int, split: str, block: int) -> tuple[int, ...]:
    n = len(COLOURS) * len(SHAPES)
    return tuple(int(i) for i in sample_rng(seed, split, block, stream=_BLOCK_STREAM).permutation(n))


def draw_attributes(seed: int, split: str, index: int, rng: np.random.Generator) -> Attributes:
    """Balanced colour-shape pair from the block permutation; size and position drawn freely."""
    block = _colour_shape_block(seed, split, index // (len(COLOURS) * len(SHAPES)))
    pair = block[index % len(block)]
    colour, shape = list(COLOURS)[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
    return Attributes(colour, shape, SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))])


# ------------------------------------------------------------------------------------------------- drawing
@lru_cache(maxsize=8)
def _unit_ramps(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    return xs, ys


def _shape_rgb(colour: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLOURS[colour], dtype=np.float32)
    return np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)


def _background_base(shape_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A muted random colour far enough from the shape colour; rejection sampling with a fixed fallback."""
    for _ in range(64):
        raw = rng.uniform(0, 255, 3).astype(np.float32)
        base = raw * (1 - BACKGROUND_GREY_MIX) + raw.mean() * BACKGROUND_GREY_MIX
        if np.linalg.norm(base - shape_rgb) >= MIN_CONTRAST:
            return base
    grey = 40.0 if shape_rgb.mean() > 127 else 215.0
    return np.full(3, grey, dtype=np.float32)


def _background(size: int, shape_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    base = _background_base(shape_rgb, rng)
    xs, ys = _unit_ramps(size)
    gx, gy = rng.uniform(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE, 2)
    cells = -(-size // NOISE_BLOCK)
    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (cells, cells, 1)).astype(np.float32)
    noise = noise.repeat(NOISE_BLOCK, 0).repeat(NOISE_BLOCK, 1)[:size, :size]
    pixels = base + (gx * xs + gy * ys)[..., None] + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return [(cx + rad * np.cos(a), cy - rad * np.sin(a)) for a, rad in zip(angles, radii, strict=True)]


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = 0.35 * r
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: int | tuple[int, ...]) -> None:
    """Draw `shape` centred on (cx, cy) within a box of half-side r (no anti-aliasing: one flat colour)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


@dataclass(frozen=True)
class ShapeGeometry:
    """Where a sample's shape is drawn, in pixels: centre, half-side of its box, and its flat fill colour."""

    shape: str
    cx: float
    cy: float
    r: float
    fill: tuple[int, int, int]


def _layout(attrs: Attributes, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ShapeGeometry]:
    """The background pixels and the shape's geometry: every random draw of a sample's image, in their order."""
    shape_rgb = _shape_rgb(attrs.colour, rng)
    background = _background(size, shape_rgb, rng)
    ax, ay = POSITION_ANCHORS[attrs.position]
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
    radius = rng.uniform(*RADIUS_RANGE[attrs.size])
    side = size - 1
    fill = tuple(int(v) for v in shape_rgb)
    return background, ShapeGeometry(attrs.shape, (ax + jx) * side, (ay + jy) * side, radius * side, fill)


def _paint(image: Image.Image, g: ShapeGeometry, fill: int | tuple[int, ...]) -> Image.Image:
    draw_shape(ImageDraw.Draw(image), g.shape, g.cx, g.cy, g.r, fill)
    return image


def render_image(attrs: Attributes, size: int, rng: np.random.Generator) -> Image.Image:
    background, g = _layout(attrs, size, rng)
    return _paint(Image.fromarray(background), g, g.fill)


def render_image_and_mask(attrs: Attributes, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The sample's image (the same draws and pixels as :func:`render_image`) and its shape's mask drawn with the same
    geometry: mode L, 255 where the shape's flat colour was drawn, 0 elsewhere."""
    background, g = _layout(attrs, size, rng)
    return _paint(Image.fromarray(background), g, g.fill), _paint(Image.new("L", (size, size), 0), g, 255)


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "jpg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"image_format={image_format!r}; allowed: png, jpg")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ captions
def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]


def _wrong_value(attribute: str, truth: str, rng: np.random.Generator) -> str:
    values = {"colour": list(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
    return _choice(rng, [v for v in values if v != truth])


def compose_caption(attrs: Attributes, rng: np.random.Generator, noisy: bool = False) -> str:
    """One caption from the grammar; when `noisy`, one mentioned attribute is replaced by a wrong value."""
    words = {"colour": attrs.colour, "shape": attrs.shape, "size": None, "position": None}
    if rng.random() < SIZE_MENTION_PROBABILITY:
        words["size"] = attrs.size
    if rng.random() < POSITION_MENTION_PROBABILITY:
        words["position"] = attrs.position
    if noisy:
        attribute = _choice(rng, [k for k, v in words.items() if v is not None])
        words[attribute] = _wrong_value(attribute, words[attribute], rng)
    noun = f"{words['colour']} {words['shape']}"
    if words["size"]:
        noun = f"{_choice(rng, SIZE_WORDS[words['size']])} {noun}"
    if words["position"]:
        template = _choice(rng, TEMPLATES_WITH_POSITION)
        text = template.format(a=_with_article(noun), the=f"the {noun}",
                               pos=_choice(rng, POSITION_PHRASES[words["position"]]))
    else:
        text = _choice(rng, TEMPLATES_WITHOUT_POSITION).format(a=_with_article(noun), the=f"the {noun}")
    return text[0].upper() + text[1:]


def _distinct_captions(attrs: Attributes, rng: np.random.Generator, count: int) -> list[str]:
    captions = [compose_caption(attrs, rng)]
    attempts = 0
    while len(captions) < count and attempts < 50 * count:
        attempts += 1
        caption = compose_caption(attrs, rng)
        if caption not in captions:
            captions.append(caption)
    return captions


# ------------------------------------------------------------------------------------------------- samples
def make_sample(seed: int, split: str, index: int, image_size: int, noise_fraction: float,
                image_format: str = "png") -> Sample:
    """The sample `index` of `split`: a pure function of its arguments."""
    rng = sample_rng(seed, split, index)
    attrs = draw_attributes(seed, split, index, rng)
    image = encode_image(render_image(attrs, image_size, rng), image_format)
    noisy = split == "train" and rng.random() < noise_fraction
    if split == "test":
        captions = _distinct_captions(attrs, rng, TEST_CAPTIONS)
    else:
        captions = [compose_caption(attrs, rng, noisy=noisy)]
    meta = {"colour": attrs.colour, "shape": attrs.shape, "size": attrs.size, "position": attrs.position,
            "colour_shape": attrs.colour_shape, "caption_noisy": noisy, "captions": captions}
    return Sample(key=f"{split}-{index:08d}", image=image, image_ext=image_format, caption=captions[0], meta=meta)


def iter_split(cfg: DataConfig, split: str) -> Iterator[Sample]:
    syn = cfg.synthetic
    for index in range(split_sizes(cfg)[split]):
        yield make_sample(cfg.seed, split, index, syn.image_size, syn.noise_fraction, cfg.image_format)


def iter_synthetic(cfg: DataConfig) -> Iterator[tuple[str, Sample]]:
    """(split, sample) for every split in order: train, val, test."""
    for split in SPLITS:
        for sample in iter_split(cfg, split):
            yield split, sample
