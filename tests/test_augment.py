"""Replayable augmentations (DataCompDR format): bit-exact replay, crop and magnitudes against independent references
(PIL, torchvision's own RandomResizedCrop/RandAugment), box statistics, determinism, replay at another size."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from lightclip_core.data.augment import OP_NAMES, AugParams, ReplayableAugment, sample_generator

BILINEAR = T.InterpolationMode.BILINEAR
PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
SIZES = [(64, 72), (96, 48), (48, 80)]  # (width, height), non-square on purpose
IDENTITY_OPS = ((0, 0.0), (0, 0.0))
SIGNED = {name for name, (_, signed) in T.RandAugment()._augmentation_space(31, (8, 8)).items() if signed}


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise with a few drawn shapes: every resampling or geometric difference shows up in the pixels."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 6, width // 2, height // 2), fill=(250, 20, 20))
    draw.ellipse((width // 3, height // 3, width - 4, height - 4), fill=(20, 200, 60))
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def draws(aug: ReplayableAugment, image: Image.Image, n: int, seed: int = 0) -> list[AugParams]:
    return [aug.sample(image, sample_generator(seed, "draws", k)) for k in range(n)]


# ------------------------------------------------------------------------------------------ 1. bit-exact replay
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("width,height", SIZES)
def test_replay_is_bit_exact_also_after_json_round_trip(width, height, interpolation):
    image = make_image(width, height)
    aug = ReplayableAugment(40, magnitude=20, interpolation=interpolation)
    for k in range(40):
        out, params = aug(image, sample_generator(1, "img", k))
        assert out.size == (40, 40) and out.mode == "RGB"
        np.testing.assert_array_equal(pixels(aug.apply(image, params)), pixels(out))
        restored = AugParams.from_json(json.loads(json.dumps(params.to_json())))
        assert restored == params
        np.testing.assert_array_equal(pixels(aug.apply(image, restored)), pixels(out))


def test_to_json_is_plain_python():
    params = ReplayableAugment(32).sample(make_image(64, 72), sample_generator(0, "plain", 0))
    box, ops = params.to_json()
    assert all(type(v) is int for v in box)
    assert all(type(k) is int and type(m) is float for k, m in ops)


# ------------------------------------------------------------------------------------------ 2. crop vs PIL
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_equals_plain_pil_crop_and_resize(interpolation):
    """Reference: PIL's own crop + resize, written out here without torchvision. torchvision's PIL backend resizes
    with PIL (always antialiased), so this must agree bit for bit, and it does not share our code path."""
    image = make_image(96, 48)
    aug = ReplayableAugment(36, interpolation=interpolation)
    for k in range(30):
        i, j, h, w = aug.sample(image, sample_generator(2, "crop", k)).box
        expected = image.crop((j, i, j + w, i + h)).resize((36, 36), PIL_RESAMPLE[interpolation])
        for ops in (IDENTITY_OPS, None):
            np.testing.assert_array_equal(pixels(aug.apply(image, AugParams((i, j, h, w), ops))), pixels(expected))


# ------------------------------------------------------------------------------------------ torchvision itself
@pytest.mark.parametrize("width,height", SIZES)
def test_same_seed_reproduces_torchvision_pipeline(width, height):
    """A generator seeded like the global RNG gives exactly torchvision's RandomResizedCrop + RandAugment output."""
    image = make_image(width, height, seed=3)
    aug = ReplayableAugment(32, magnitude=15)
    reference = T.Compose([T.RandomResizedCrop(32, interpolation=BILINEAR, antialias=True),
                           T.RandAugment(num_ops=2, magnitude=15, num_magnitude_bins=31, interpolation=BILINEAR)])
    for seed in range(25):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = reference(image)
        out, _ = aug(image, torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(pixels(out), pixels(expected))


def test_fallback_central_crop_matches_torchvision():
    """Scale/ratio that can never fit force torchvision's central-crop fallback; our box must be the same."""
    image = make_image(64, 64)
    aug = ReplayableAugment(32, scale=(0.9, 1.0), ratio=(3.0, 4.0))
    for seed in range(5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = T.RandomResizedCrop.get_params(image, [0.9, 1.0], [3.0, 4.0])
        box = aug.sample(image, torch.Generator().manual_seed(seed)).box
        assert box == expected == ((64 - 21) // 2, 0, 21, 64)


# ------------------------------------------------------------------------------------------ 3. box statistics
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.25, 0.6), (0.5, 2.0))])
@pytest.mark.parametrize("width,height", SIZES)
def test_boxes_lie_inside_with_area_and_ratio_in_range(width, height, scale, ratio):
    image = make_image(width, height)
    aug = ReplayableAugment(32, scale=scale, ratio=ratio)
    for params in draws(aug, image, 300):
        i, j, h, w = params.box
        assert i >= 0 and j >= 0 and h > 0 and w > 0 and i + h <= height and j + w <= width
        if w == width and (i, j) == ((height - h) // 2, 0) or h == height and (i, j) == (0, (width - w) // 2):
            continue  # the central-crop fallback ignores scale
        # w and h are rounded from sqrt(area * r) and sqrt(area / r): widen the bounds by half a pixel each way
        area = width * height
        assert (w - 0.5) * (h - 0.5) / area <= scale[1] and (w + 0.5) * (h + 0.5) / area >= scale[0]
        assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]


def test_op_indices_uniform_and_signs_balanced():
    aug = ReplayableAugment(32)
    ops = [op for params in draws(aug, make_image(48, 80), 2000, seed=4) for op in params.ops]
    assert len(ops) == 4000
    counts = np.bincount([k for k, _ in ops], minlength=len(OP_NAMES))
    assert stats.chisquare(counts).pvalue > 1e-4
    signs = [m < 0 for k, m in ops if OP_NAMES[k] in SIGNED]
    assert stats.binomtest(sum(signs), len(signs)).pvalue > 1e-4


# ------------------------------------------------------------------------------------------ 4. magnitudes
@pytest.mark.parametrize("size,magnitude,bins", [(32, 9, 31), (64, 30, 31), (40, 3, 10)])
def test_magnitudes_equal_torchvision_table_up_to_sign(size, magnitude, bins):
    table = T.RandAugment()._augmentation_space(bins, (size, size))
    assert list(table) == OP_NAMES
    aug = ReplayableAugment(size, magnitude=magnitude, num_magnitude_bins=bins)
    seen = set()
    for params in draws(aug, make_image(64, 72), 300, seed=5):
        for k, m in params.ops:
            values, signed = table[OP_NAMES[k]]
            expected = float(values[magnitude]) if values.ndim > 0 else 0.0
            assert (abs(m) if signed else m) == expected
            seen.add(k)
    assert seen == set(range(len(OP_NAMES)))


# ------------------------------------------------------------------------------------------ 5. determinism
def test_same_generator_seed_gives_same_params():
    aug, image = ReplayableAugment(32), make_image(64, 72)
    for seed in range(10):
        assert aug.sample(image, torch.Generator().manual_seed(seed)) == aug.sample(
            image, torch.Generator().manual_seed(seed))
        assert aug.sample(image, sample_generator(seed, "k", 1)) == aug.sample(image, sample_generator(seed, "k", 1))


def test_sample_generator_depends_on_seed_key_and_index():
    def first(g: torch.Generator) -> list[int]:
        return torch.randint(0, 2**62, (4,), generator=g).tolist()

    base = first(sample_generator(0, "a", 0))
    assert first(sample_generator(0, "a", 0)) == base
    variants = [(1, "a", 0), (0, "b", 0), (0, "a", 1), (0, "a/0", 0)]
    results = [first(sample_generator(*v)) for v in variants]
    assert all(r != base for r in results) and len({tuple(r) for r in results}) == len(results)


def test_sampling_and_applying_leave_global_rng_alone():
    aug, image = ReplayableAugment(32, magnitude=20), make_image(96, 48)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for k in range(20):
        aug(image, sample_generator(0, "rng", k))
    assert torch.equal(torch.random.get_rng_state(), before)


# ------------------------------------------------------------------------------------------ 6. another resolution
def test_identity_replay_at_other_size_is_resized_crop_of_same_box():
    image = make_image(64, 72)
    aug = ReplayableAugment(64)
    for k in range(10):
        i, j, h, w = aug.sample(image, sample_generator(6, "res", k)).box
        out = aug.apply(image, AugParams((i, j, h, w), IDENTITY_OPS), size=32, reference_size=64)
        expected = F.resized_crop(image, i, j, h, w, [32, 32], BILINEAR, antialias=True)
        np.testing.assert_array_equal(pixels(out), pixels(expected))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_translation_is_rescaled_and_other_ops_are_not(sign):
    image, aug = make_image(64, 72), ReplayableAugment(64, magnitude=30)
    table = T.RandAugment()._augmentation_space(31, (64, 64))
    m = sign * float(table["TranslateX"][0][30])  # 29 px at 64
    box = (4, 6, 50, 40)
    small = F.resized_crop(image, *box, [32, 32], BILINEAR, antialias=True)
    replay = pixels(aug.apply(image, AugParams(box, ((OP_NAMES.index("TranslateX"), m),)), size=32, reference_size=64))
    np.testing.assert_array_equal(replay, pixels(_apply_op(small, "TranslateX", m / 2, BILINEAR, None)))
    assert not np.array_equal(replay, pixels(_apply_op(small, "TranslateX", m, BILINEAR, None)))
    r = sign * 25.0
    rotated = aug.apply(image, AugParams(box, ((OP_NAMES.index("Rotate"), r),)), size=32, reference_size=64)
    np.testing.assert_array_equal(pixels(rotated), pixels(_apply_op(small, "Rotate", r, BILINEAR, None)))


# ------------------------------------------------------------------------------------------ 7. DataCompDR entries
@pytest.mark.parametrize("entry", [[[3, 5, 40, 50], [[3, -12.5], [11, 128.0]]],
                                   ((3, 5, 40, 50), ((3, -12.5), (11, 128.0)))])
def test_datacompdr_entry_decodes_and_applies(entry):
    params = AugParams.from_json(entry)
    assert params == AugParams((3, 5, 40, 50), ((3, -12.5), (11, 128.0)))
    image = make_image(64, 72)
    out = ReplayableAugment(32).apply(image, params)
    crop = image.crop((5, 3, 55, 43)).resize((32, 32), Image.BILINEAR)
    expected = _apply_op(_apply_op(crop, "TranslateX", -12.5, BILINEAR, None), "Solarize", 128.0, BILINEAR, None)
    np.testing.assert_array_equal(pixels(out), pixels(expected))
    assert AugParams.from_json([[0, 0, 8, 8], None]).ops is None


@pytest.mark.parametrize("entry,message", [
    ("abc", "length 2"),
    ([[0, 0, 8, 8]], "length 2"),
    ([[0, 0, 8], None], "4 ints"),
    ([[0, 0, 8, 8.5], None], "must be ints"),
    ([[True, 0, 8, 8], None], "must be ints"),
    ([[0, 0, 0, 8], None], "h, w > 0"),
    ([[0, 0, 8, 8], "ops"], "ops must be a list"),
    ([[0, 0, 8, 8], [[3]]], "pair"),
    ([[0, 0, 8, 8], [[14, 0.0]]], "op index"),
    ([[0, 0, 8, 8], [[-1, 0.0]]], "op index"),
    ([[0, 0, 8, 8], [[3.0, 1.0]]], "op index"),
    ([[0, 0, 8, 8], [[3, "1.0"]]], "magnitude"),
    ([[0, 0, 8, 8], [[3, math.nan]]], "magnitude"),
])
def test_from_json_rejects_malformed_entries(entry, message):
    with pytest.raises(ValueError, match=message) as info:
        AugParams.from_json(entry)
    assert "\n" not in str(info.value)


def test_box_outside_image_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        ReplayableAugment(32).apply(make_image(48, 80), AugParams((40, 0, 41, 10), IDENTITY_OPS))


# ------------------------------------------------------------------------------------------ 8. configured op pools
POOL = {"ShearY": 5, "Rotate": 4, "Color": 9, "Sharpness": 12, "Posterize": 30}


def test_ops_are_drawn_only_from_the_pool_each_at_its_own_magnitude():
    aug = ReplayableAugment(48, ops=POOL)
    table = T.RandAugment()._augmentation_space(31, (48, 48))
    drawn = [op for params in draws(aug, make_image(64, 72), 700, seed=8) for op in params.ops]
    counts = {name: sum(OP_NAMES[k] == name for k, _ in drawn) for name in POOL}
    assert {OP_NAMES[k] for k, _ in drawn} == set(POOL)
    assert stats.chisquare(list(counts.values())).pvalue > 1e-4  # uniform over the pool
    for k, m in drawn:
        values, signed = table[OP_NAMES[k]]
        assert (abs(m) if signed else m) == float(values[POOL[OP_NAMES[k]]])
    assert {m < 0 for k, m in drawn if OP_NAMES[k] == "Rotate"} == {True, False}


def test_a_list_of_names_takes_the_common_magnitude_and_the_pool_order_does_not_matter():
    image = make_image(64, 72)
    listed = ReplayableAugment(32, magnitude=7, ops=["Rotate", "ShearX"])
    mapped = ReplayableAugment(32, ops={"ShearX": 7, "Rotate": 7})
    reordered = ReplayableAugment(32, ops={"Rotate": 7, "ShearX": 7})
    assert draws(listed, image, 50) == draws(mapped, image, 50) == draws(reordered, image, 50)


def test_all_ops_is_torchvisions_randaugment_draw_for_draw():
    image = make_image(64, 72)
    assert draws(ReplayableAugment(32, ops="all"), image, 100) == draws(ReplayableAugment(32), image, 100)
    every = ReplayableAugment(32, ops=dict.fromkeys(OP_NAMES, 9))
    assert draws(every, image, 100) == draws(ReplayableAugment(32), image, 100)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_replay_of_a_pool_equals_the_sampled_view(interpolation):
    image = make_image(96, 48)
    aug = ReplayableAugment(40, scale=(0.7, 1.0), ratio=(0.9, 1.1), ops=POOL, interpolation=interpolation)
    for k in range(30):
        out, params = aug(image, sample_generator(3, "pool", k))
        restored = AugParams.from_json(json.loads(json.dumps(params.to_json())))
        np.testing.assert_array_equal(pixels(aug.apply(image, restored)), pixels(out))
        # stored indices replay without knowing the pool (the trainer's ReplayableAugment has none)
        np.testing.assert_array_equal(pixels(ReplayableAugment(40, interpolation=interpolation).apply(image, restored)),
                                      pixels(out))


@pytest.mark.parametrize("ops,message", [({"Rotat": 3}, "unknown ops"), ({}, "empty"), ({"Rotate": 31}, "bin"),
                                         ({"Rotate": 2.0}, "bin"), ("Rotate", "a list of op names")])
def test_bad_pools_are_rejected(ops, message):
    with pytest.raises(ValueError, match=message):
        ReplayableAugment(32, ops=ops)


def test_geometry_replay_moves_a_mask_with_the_view_and_skips_photometric_ops():
    grey = Image.fromarray(np.asarray(make_image(64, 72))[..., 1])  # one channel, textured
    aug = ReplayableAugment(48, ops={"ShearX": 20, "TranslateY": 20, "Rotate": 20, "Solarize": 9, "Equalize": 0})
    geometric = {OP_NAMES.index(n) for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")}
    for k in range(20):
        params = aug.sample(grey, sample_generator(9, "mask", k))
        moved = pixels(aug.apply_geometry(grey, params, size=32, reference_size=48))
        assert moved.ndim == 2 and moved.shape == (32, 32)
        only_geometric = AugParams(params.box, tuple(op for op in params.ops if op[0] in geometric))
        expected = pixels(aug.apply(grey, only_geometric, size=32, reference_size=48))  # RGB of the same grey
        for channel in range(3):
            np.testing.assert_array_equal(moved, expected[..., channel])
