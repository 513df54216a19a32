"""The synthetic dataset: determinism, labels that match the pixels, caption grammar and noise, tasks."""
from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from lightclip_core.config import DataConfig
from lightclip_core.data.caption_attributes import NamedAttributes, parse_caption, true_attributes
from lightclip_core.data.prepare import prepare
from lightclip_core.data.shards import iter_raw_samples, read_manifest, shard_paths, verify_shards
from lightclip_core.data.synthetic import (COLOURS, POSITION_ANCHORS, POSITION_PHRASES, POSITIONS, SHAPES, SIZE_WORDS,
                                          SIZES, TEMPLATES_WITH_POSITION, TEMPLATES_WITHOUT_POSITION,
                                          Attributes, colour_shape_classes, compose_caption, make_sample,
                                          synthetic_tasks)


def small_config(seed: int = 0, **synthetic) -> DataConfig:
    sizes = {"num_train": 60, "num_val": 12, "num_test": 48, "image_size": 32, "noise_fraction": 0.2}
    return DataConfig(seed=seed, samples_per_shard=25, synthetic={**sizes, **synthetic})


def shard_hashes(out_dir: Path) -> dict[str, list[str]]:
    return {split: [s["sha256"] for s in read_manifest(out_dir / split)["shards"]]
            for split in ("train", "val", "test")}


def read_split(split_dir: Path) -> list[dict]:
    return list(iter_raw_samples(shard_paths(split_dir)))


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_shards_and_another_seed_does_not(tmp_path: Path) -> None:
    a = prepare(small_config(seed=3), tmp_path / "a")
    b = prepare(small_config(seed=3), tmp_path / "b")
    c = prepare(small_config(seed=4), tmp_path / "c")
    assert a.counts == b.counts == {"train": 60, "val": 12, "test": 48}
    assert shard_hashes(a.out_dir) == shard_hashes(b.out_dir)
    for split in ("train", "val", "test"):
        assert not set(shard_hashes(a.out_dir)[split]) & set(shard_hashes(c.out_dir)[split])
        verify_shards(a.out_dir / split)


def test_manifest_records_params_and_tasks(tmp_path: Path) -> None:
    cfg = small_config()
    result = prepare(cfg, tmp_path / "out")
    manifest = read_manifest(result.out_dir / "test")
    assert manifest["params"] == cfg.model_dump(mode="json")
    assert manifest["tasks"] == synthetic_tasks()
    assert [s["num_samples"] for s in read_manifest(result.out_dir / "train")["shards"]] == [25, 25, 10]


def test_splits_are_independent_streams() -> None:
    images = {split: make_sample(0, split, 5, 32, 0.0).image for split in ("train", "val", "test")}
    assert len(set(images.values())) == 3
    assert make_sample(0, "val", 5, 32, 0.0).image == images["val"]


def test_rerun_replaces_previous_output_without_stale_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(small_config(num_train=80), out)
    prepare(small_config(num_train=30), out)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["manifest.json", "train-000000.tar",
                                                                 "train-000001.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left behind


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare(small_config(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# -------------------------------------------------------------------------------- pixels match the labels
def _measure(image: Image.Image) -> dict[str, str]:
    """Recover the labels from pixels alone: the shape is every pixel far from the (median border) background."""
    a = np.asarray(image.convert("RGB")).astype(np.float32)
    side = a.shape[0]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    mask = np.linalg.norm(a - np.median(border, axis=0), axis=2) > 60
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    mean = a[mask].mean(axis=0)
    centre = ((xs.min() + xs.max()) / 2 / (side - 1), (ys.min() + ys.max()) / 2 / (side - 1))
    rows = mask[ys.min():ys.max() + 1].sum(axis=1)
    widest_row = np.flatnonzero(rows == rows.max()).mean() / (height - 1)
    return {
        "colour": min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c]))),
        "position": min(POSITION_ANCHORS, key=lambda p: np.hypot(*np.subtract(POSITION_ANCHORS[p], centre))),
        "size": "large" if max(height, width) / side > 0.3 else "small",
        "shape": _shape_from_mask(mask.sum() / (height * width), widest_row),
    }


def _shape_from_mask(fill: float, widest_row: float) -> str:
    if fill > 0.9:
        return "square"
    if widest_row > 0.85:  # only the triangle is widest at its base
        return "triangle"
    if fill > 0.73:
        return "circle"
    if fill > 0.54:
        return "cross"
    return "diamond" if fill > 0.475 else "star"


def test_drawn_image_matches_labels() -> None:
    for index in range(150):
        sample = make_sample(7, "val", index, 64, 0.0)
        measured = _measure(Image.open(io.BytesIO(sample.image)))
        truth = {k: sample.meta[k] for k in ("colour", "position", "size", "shape")}
        assert measured == truth, f"sample {index}: {measured} != {truth}"


def test_jpg_format_is_a_jpeg() -> None:
    sample = make_sample(0, "train", 0, 32, 0.0, image_format="jpg")
    assert sample.image_ext == "jpg"
    assert Image.open(io.BytesIO(sample.image)).format == "JPEG"


# ----------------------------------------------------------------------------------------------- captions
def _has(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def _mentions(caption: str) -> dict[str, set[str]]:
    text = caption.lower()
    return {
        "colour": {c for c in COLOURS if _has(text, c)},
        "shape": {s for s in SHAPES if _has(text, s)},
        "size": {size for size, words in SIZE_WORDS.items() if any(_has(text, w) for w in words)},
        "position": {p for p, phrases in POSITION_PHRASES.items() if any(_has(text, ph) for ph in phrases)},
    }


def _wrong_attributes(meta: dict, caption: str) -> list[str]:
    mentioned = _mentions(caption)
    return [attr for attr, values in mentioned.items() if values - {meta[attr]}]


def test_noise_fraction_is_respected_and_noisy_captions_have_one_wrong_attribute() -> None:
    samples = [make_sample(1, "train", i, 16, 0.3) for i in range(1000)]
    noisy = [s for s in samples if s.meta["caption_noisy"]]
    assert abs(len(noisy) / len(samples) - 0.3) < 0.05
    for s in samples:
        wrong = _wrong_attributes(s.meta, s.caption)
        assert len(wrong) == (1 if s.meta["caption_noisy"] else 0), (s.caption, s.meta)


def test_clean_captions_mention_colour_and_shape_words() -> None:
    for i in range(300):
        s = make_sample(2, "train", i, 16, 0.0)
        assert s.meta["colour_shape"] in s.caption, s.caption
        assert s.meta["captions"] == [s.caption]
        assert not s.meta["caption_noisy"]


def test_captions_vary() -> None:
    captions = {make_sample(0, "train", i, 16, 0.0).caption for i in range(200)}
    assert len(captions) > 150


def test_held_out_splits_are_clean_and_test_has_two_different_captions() -> None:
    for i in range(100):
        val = make_sample(0, "val", i, 16, 1.0)
        test = make_sample(0, "test", i, 16, 1.0)
        assert not val.meta["caption_noisy"] and val.meta["captions"] == [val.caption]
        assert not test.meta["caption_noisy"]
        assert len(test.meta["captions"]) == 2 and len(set(test.meta["captions"])) == 2
        assert test.caption == test.meta["captions"][0]
        for caption in test.meta["captions"]:
            assert not _wrong_attributes(test.meta, caption), caption


# ------------------------------------------------------------------------------- captions parsed back
class ScriptedRng:
    """Stands in for numpy's Generator in `compose_caption`: replays a script of decisions (option indices), takes
    option 0 at every decision past its end and records how many options each decision had, so that a depth-first
    walk over the scripts visits every caption the grammar can produce."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.taken, self.options = script, [], []

    def _decide(self, options: int) -> int:
        choice = self.script[len(self.taken)] if len(self.taken) < len(self.script) else 0
        self.taken.append(choice)
        self.options.append(options)
        return choice

    def random(self) -> float:  # option 0 is below any probability, option 1 above any below 1 - 1e-9
        return (0.0, 1 - 1e-9)[self._decide(2)]

    def integers(self, high: int) -> int:
        return self._decide(high)


def every_script(compose: Callable[[ScriptedRng], str]) -> Iterator[list[int]]:
    """Every sequence of decisions `compose` can take."""
    pending: list[list[int]] = [[]]
    while pending:
        rng = ScriptedRng(pending.pop())
        compose(rng)
        for i in range(len(rng.script), len(rng.taken)):
            pending += [rng.taken[:i] + [option] for option in range(1, rng.options[i])]
        yield rng.taken


def other(values: tuple[str, ...], value: str) -> str:
    return values[(values.index(value) + 1) % len(values)]


def expected_parse(attrs: Attributes, compose: Callable[[Attributes], str]) -> NamedAttributes:
    """What a caption names, found without reading it: an attribute is named if and only if changing it (with the
    same random decisions) changes the caption."""
    caption = compose(attrs)
    size_named = compose(replace(attrs, size=other(SIZES, attrs.size))) != caption
    position_named = compose(replace(attrs, position=other(POSITIONS, attrs.position))) != caption
    return NamedAttributes(attrs.colour, attrs.shape, attrs.size if size_named else None,
                           attrs.position if position_named else None)


def test_every_caption_of_the_grammar_parses_back_to_the_attributes_it_names() -> None:
    seen: set[str] = set()
    named_sets = set()
    for values in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS):
        attrs = Attributes(*values)
        for script in every_script(lambda rng: compose_caption(attrs, rng)):
            def compose(a: Attributes, script: list[int] = script) -> str:
                return compose_caption(a, ScriptedRng(script))
            caption = compose(attrs)
            expected = expected_parse(attrs, compose)
            assert parse_caption(caption) == expected, caption
            seen.add(caption)
            named_sets.add((expected.size is not None, expected.position is not None))
    # the walk covers the grammar: every wording of every colour and shape, with and without size and position
    nouns = 1 + sum(len(words) for words in SIZE_WORDS.values())
    endings = len(TEMPLATES_WITHOUT_POSITION) + len(TEMPLATES_WITH_POSITION) * sum(map(len, POSITION_PHRASES.values()))
    assert len(seen) == len(COLOURS) * len(SHAPES) * nouns * endings
    assert named_sets == {(False, False), (False, True), (True, False), (True, True)}


def test_captions_of_seeded_generators_parse_back_to_the_attributes_they_name() -> None:
    # the same check with numpy's generator, as make_sample calls it (every attribute draws as many numbers
    # whatever its value, so a seed takes the same decisions for changed attributes)
    picks = np.random.default_rng(0)
    for seed in range(2000):
        attrs = Attributes(*(str(picks.choice(v)) for v in (list(COLOURS), SHAPES, SIZES, POSITIONS)))
        def compose(a: Attributes, seed: int = seed) -> str:
            return compose_caption(a, np.random.default_rng(seed))
        assert parse_caption(compose(attrs)) == expected_parse(attrs, compose), compose(attrs)


def test_test_captions_name_only_true_attributes() -> None:
    for i in range(100):
        sample = make_sample(0, "test", i, 16, 0.0)
        truth = true_attributes(sample.meta)
        for caption in sample.meta["captions"]:
            named = parse_caption(caption)
            assert named.is_true_of(truth) and named.colour and named.shape, caption


def test_parse_caption_reads_case_and_spacing_freely_and_refuses_two_values() -> None:
    assert parse_caption("  A TINY  red circle  ON THE  LEFT-HAND SIDE.") == \
        NamedAttributes("red", "circle", "small", "left")
    assert parse_caption("a circle") == NamedAttributes(shape="circle")
    assert parse_caption("a redcircle across the page") == NamedAttributes()  # whole words only
    with pytest.raises(ValueError, match="several values of colour"):
        parse_caption("a red and blue circle")
    with pytest.raises(ValueError, match="size='medium'"):
        true_attributes({"colour": "red", "shape": "circle", "size": "medium", "position": "left"})


# -------------------------------------------------------------------------------------------------- tasks
def test_every_class_of_every_task_appears_in_a_small_split(tmp_path: Path) -> None:
    result = prepare(small_config(), tmp_path / "out")
    samples = read_split(result.out_dir / "test")
    tasks = read_manifest(result.out_dir / "test")["tasks"]
    assert set(tasks) == {"shape", "colour", "colour_shape"}
    for name, task in tasks.items():
        labels = {json.loads(raw["json"])[task["label_key"]] for raw in samples}
        assert labels == set(task["classes"]), name
        assert task["templates"] and all("{}" in t for t in task["templates"])
    assert tasks["colour_shape"]["classes"] == colour_shape_classes()


def test_class_names_are_the_words_the_captions_use() -> None:
    captions = " ".join(make_sample(0, "train", i, 16, 0.0).caption for i in range(96))
    for task in synthetic_tasks().values():
        for name in task["classes"]:
            assert name in captions, name
