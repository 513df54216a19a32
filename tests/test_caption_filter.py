"""The synthetic-caption filter (issue #16; data/caption_filter.py): the teachers' stored image-caption score decides
which synthetic captions a reinforced sample offers the student, checked against torch's cosine similarity and a
brute-force reading of the rule, and through the product's decoder and configuration."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightclip_core.config import ConfigError, load_config
from lightclip_core.data.caption_filter import kept_synthetic, teacher_scores
from lightclip_core.data.reinforced import encode_reinforcement
from lightclip_core.models.tokenizer import tokenize
from lightclip_core.train.data import ReinforcedDecoder

ROOT = Path(__file__).resolve().parents[1]
DIMS = [3, 5]  # two teachers of different widths, side by side


def cosine_by_teacher(image: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """The independent reference: torch's cosine similarity per teacher slice, averaged over the teachers."""
    img, txt = torch.from_numpy(image).double(), torch.from_numpy(texts).double()
    per_teacher = [F.cosine_similarity(i.expand_as(t), t, dim=1)
                   for i, t in zip(img.split(DIMS), txt.split(DIMS, dim=1))]
    return torch.stack(per_teacher).mean(0).numpy()


def test_the_score_is_the_mean_over_teachers_of_each_teachers_cosine():
    rng = np.random.default_rng(0)
    image, texts = rng.normal(size=sum(DIMS)), rng.normal(size=(7, sum(DIMS))) * rng.uniform(0.1, 9, (7, 1))
    np.testing.assert_allclose(teacher_scores(image, texts, DIMS), cosine_by_teacher(image, texts), atol=1e-6)


def test_a_synthetic_caption_is_kept_when_it_scores_at_least_the_ground_truth_minus_the_margin():
    rng = np.random.default_rng(1)
    for _ in range(50):
        image, truth, syn = rng.normal(size=sum(DIMS)), rng.normal(size=sum(DIMS)), rng.normal(size=(5, sum(DIMS)))
        margin = float(rng.uniform(-0.3, 0.3))
        reference = cosine_by_teacher(image, truth[None])[0]
        expected = [cosine_by_teacher(image, row[None])[0] >= reference - margin for row in syn]
        assert kept_synthetic(image, truth, syn, DIMS, margin).tolist() == expected


def test_widths_that_disagree_with_the_teacher_dims_are_refused():
    with pytest.raises(ValueError, match="teacher dims"):
        teacher_scores(np.ones(7), np.ones((2, 8)), DIMS)


# ------------------------------------------------------------------------------------------ the decoder
def raw_sample(key: str, caption: str, syn_texts: list[str], image_emb: np.ndarray, text_emb: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "png")
    views = [[[0, 0, 16, 16], None]] * image_emb.shape[0]
    return {"__key__": key, "png": buf.getvalue(), "txt": caption.encode(),
            **encode_reinforcement(views, syn_texts, image_emb, text_emb, dtype="float32")}


def decoder(margin: float | None) -> ReinforcedDecoder:
    overrides = ["objectives.distill.caption_batches=both"]
    if margin is not None:
        overrides.append(f"objectives.distill.synthetic_filter_margin={margin}")
    cfg = load_config(ROOT / "params.yaml", overrides)
    return ReinforcedDecoder(cfg, {"image_size": 16, "dims": DIMS})


def samples(n: int = 40, seed: int = 0) -> list[dict]:
    """Samples with two views and three synthetic captions each, embeddings at random."""
    rng = np.random.default_rng(seed)
    return [raw_sample(f"s{k}", f"a red square number {k}", [f"syn {k} {j}" for j in range(3)],
                       rng.normal(size=(2, sum(DIMS))), rng.normal(size=(4, sum(DIMS)))) for k in range(n)]


def test_a_margin_that_keeps_every_caption_picks_what_the_unfiltered_decoder_picks():
    off, keep_all = decoder(None), decoder(1e6)
    for raw in samples():
        a, b = off(raw), keep_all(raw)
        assert "syn_kept" not in a and bool(b["syn_kept"])
        assert set(a) | {"syn_kept"} == set(b)
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_the_decoder_offers_only_kept_captions_and_the_ground_truth_when_none_is_kept():
    filtered = decoder(0.0)
    stand_ins = 0
    for raw in samples(seed=2):
        out = filtered(raw)
        emb = np.load(io.BytesIO(raw["npz"]))
        views, texts = emb["image_emb"], emb["text_emb"]
        view = next(v for v in views if np.array_equal(out["teacher_image_emb"].numpy(), v))
        kept = kept_synthetic(view, texts[0], texts[1:], DIMS, 0.0)
        key = raw["__key__"][1:]
        if kept.any():
            j = next(j for j in range(3) if np.array_equal(out["teacher_syn_text_emb"].numpy(), texts[1 + j]))
            assert kept[j] and bool(out["syn_kept"])
            assert torch.equal(out["syn_tokens"], tokenize(f"syn {key} {j}", out["syn_tokens"].shape[0])[0])
        else:
            stand_ins += 1
            assert not bool(out["syn_kept"])
            assert torch.equal(out["syn_tokens"], out["tokens"])
            assert np.array_equal(out["teacher_syn_text_emb"].numpy(), texts[0])
    assert 0 < stand_ins < 40  # both branches ran


def test_a_filter_on_a_run_that_uses_no_synthetic_captions_is_a_config_error():
    with pytest.raises(ConfigError, match="objectives.distill.synthetic_filter_margin"):
        load_config(ROOT / "params.yaml", ["objectives.distill.caption_batches=real",
                                           "objectives.distill.synthetic_filter_margin=0.1"])
    with pytest.raises(ConfigError, match="synthetic_filter_margin"):
        load_config(ROOT / "params.yaml", ["objectives.distill.caption_batches=both",
                                           "objectives.distill.synthetic_filter_margin=nan"])


# ------------------------------------------------------------------------------------------ the benchmark's reading
def test_the_benchmarks_reading_of_a_margin_matches_a_sample_by_sample_count():
    """benchmarks/caption_filter.py's shares, against a loop over every (sample, view, synthetic caption): a kept
    caption counts as itself, a view with none kept as its sample's ground truth in every slot."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import caption_filter as bench

    rng = np.random.default_rng(3)
    m = {"diff": rng.normal(scale=0.1, size=(60, 2, 3)), "syn_right": rng.random((60, 3)) > 0.2,
         "real_right": rng.random(60) > 0.3}
    margin = 0.05
    kept = wrong_dropped = wrong_total = slots = wrong_in_batch = 0
    for s in range(60):
        for v in range(2):
            any_kept = any(m["diff"][s, v, j] >= -margin for j in range(3))
            for j in range(3):
                keep, wrong = m["diff"][s, v, j] >= -margin, not m["syn_right"][s, j]
                kept += keep
                wrong_total += wrong
                wrong_dropped += wrong and not keep
                if keep or not any_kept:
                    slots += 1
                    wrong_in_batch += wrong if keep else not m["real_right"][s]
    got = bench.at_margin(m, margin)
    assert got["kept"] == pytest.approx(kept / 360)
    assert got["wrong_caught"] == pytest.approx(wrong_dropped / wrong_total)
    assert got["wrong_in_synthetic_batch"] == pytest.approx(wrong_in_batch / slots)


def test_the_benchmarks_target_mass_matches_a_softmax_row_by_row():
    """benchmarks/caption_filter.py's reading of the distillation targets, against torch's softmax of one teacher's
    scaled cosines row by row and a direct check of which captions are true of which image."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import caption_filter as bench

    rng = np.random.default_rng(4)
    n, width, scale = 24, 6, 9.0
    truth = rng.integers(0, 3, size=(n, 4))
    codes = np.where(rng.random((n, 4)) < 0.3, -1, np.where(rng.random((n, 4)) < 0.2, (truth + 1) % 3, truth))
    m = {"image": rng.normal(size=(n, width)).astype(np.float32), "truth": truth, "real_codes": codes,
         "real_emb": rng.normal(size=(n, width)).astype(np.float32)}
    got = bench.target_mass(m, "real", [width], [scale], batch_size=8, seed=5)
    order = np.random.default_rng(5).permutation(n)
    own, true = {True: [], False: []}, {True: [], False: []}
    for start in range(0, n, 8):
        idx = order[start:start + 8]
        image = F.normalize(torch.from_numpy(m["image"][idx]), dim=1)
        text = F.normalize(torch.from_numpy(m["real_emb"][idx]), dim=1)
        for i in range(8):
            row = torch.softmax(scale * text @ image[i], dim=0).numpy()
            fits = [all(c == -1 or c == t for c, t in zip(codes[j], truth[idx[i]])) for j in idx]
            own[fits[i]].append(row[i])
            true[fits[i]].append(sum(p for p, ok in zip(row, fits) if ok))
    assert got["own_caption_right"] == pytest.approx(np.mean(own[True]), abs=1e-6)
    assert got["own_caption_wrong"] == pytest.approx(np.mean(own[False]), abs=1e-6)
    assert got["true_captions_own_right"] == pytest.approx(np.mean(true[True]), abs=1e-6)
    assert got["true_captions_own_wrong"] == pytest.approx(np.mean(true[False]), abs=1e-6)
