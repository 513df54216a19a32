"""The teachers' and captioner's quality on a held-out split, and the gate `reinforce` applies before any shard.

Zero-shot is checked against open_clip's own zero-shot classifier, retrieval against a brute-force ranking, caption
quality against a CoCa whose weights force one caption, and the gate through the real `lightclip reinforce`.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from lightclip_core import cli
from lightclip_core.config import Config, QualityGateConfig, ReinforceConfig, TeacherSpec
from lightclip_core.data.prepare import prepare
from lightclip_core.reinforce.captioner import Captioner
from lightclip_core.reinforce.quality import QualityGateError, caption_quality, check_gate, load_split, \
    recorded_quality, teacher_quality
from lightclip_core.reinforce.teachers import Teacher
from test_teachers import _force_caption, make_coca_dir, tiny_coca

TEMPLATES = ["a photo of a {}.", "the {}."]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quality")


@pytest.fixture(scope="module")
def val_dir(root) -> Path:
    cfg = Config.model_validate({"data": {"samples_per_shard": 64, "synthetic": {
        "num_train": 48, "num_val": 96, "num_test": 8, "image_size": 32}}})
    prepare(cfg.data, root / "data")
    return root / "data" / "val"


@pytest.fixture(scope="module")
def teacher(root) -> Teacher:
    model_dir = make_coca_dir(root / "coca" / "model", tiny_coca(), seed=3)
    return Teacher(TeacherSpec(model=f"local-dir:{model_dir}"), root / "cache", torch.device("cpu"))


def test_zero_shot_equals_open_clips_classifier_and_retrieval_equals_brute_force(teacher, val_dir):
    images, captions, metas, tasks = load_split(val_dir)
    figures = teacher_quality(teacher, images, captions, metas, tasks, TEMPLATES, batch=40)
    pixels = torch.stack([teacher.transform(im) for im in images])
    with torch.inference_mode():
        image_emb = F.normalize(teacher.model.encode_image(pixels), dim=-1)
        for task, spec in tasks.items():
            weights = open_clip.build_zero_shot_classifier(
                teacher.model, teacher.tokenizer, spec["classes"], [t.format for t in spec["templates"]],
                device="cpu", use_tqdm=False)
            labels = torch.tensor([spec["classes"].index(m[spec["label_key"]]) for m in metas])
            expected = float(((image_emb @ weights).argmax(1) == labels).float().mean())
            assert figures[f"zeroshot/{task}/top1"] == pytest.approx(expected, abs=1e-9)
        text_emb = F.normalize(teacher.model.encode_text(teacher.tokenizer(captions)), dim=-1)
    sims = image_emb @ text_emb.T
    i2t = sum(int(sims[i].argmax()) == i for i in range(len(images))) / len(images)
    t2i = sum(int(sims[:, j].argmax()) == j for j in range(len(images))) / len(images)
    assert figures["retrieval/image_to_text/R@1"] == pytest.approx(i2t)
    assert figures["retrieval/text_to_image/R@1"] == pytest.approx(t2i)


def test_caption_quality_counts_the_captions_that_name_the_true_colour_and_shape(root, val_dir):
    tok = open_clip.SimpleTokenizer()
    chain = [tok.sot_token_id, *tok.encode("a red square. it"), tok.eot_token_id]
    model_dir = make_coca_dir(root / "forced" / "model", tiny_coca(), mutate=_force_caption(chain))
    captioner = Captioner(TeacherSpec(model=f"local-dir:{model_dir}"), root / "cache", "cpu")
    images, _, metas, _ = load_split(val_dir)
    figures = caption_quality(captioner, images, metas, ReinforceConfig(num_captions=2, max_caption_tokens=8),
                              batch=32)
    red = sum(m["colour"] == "red" for m in metas) / len(metas)
    square = sum(m["shape"] == "square" for m in metas) / len(metas)
    both = sum(m["colour"] == "red" and m["shape"] == "square" for m in metas) / len(metas)
    assert 0 < both < red < 1 and 0 < square < 1  # the split's balanced pairs make every figure informative
    assert figures == pytest.approx({"captions/colour": red, "captions/shape": square, "captions/colour_shape": both})
    assert caption_quality(captioner, images, [{"caption": "x"}] * len(images), ReinforceConfig()) == {}


def test_gate_names_the_first_teacher_figure_and_threshold_below_it():
    metrics = {"quality/model/zeroshot/colour_shape/top1": 0.9, "quality/second/zeroshot/colour_shape/top1": 0.4,
               "quality/captioner/captions/colour": 0.99, "quality/captioner/captions/shape": 0.2,
               "quality/other/zeroshot/colour_shape/top1": 0.0, "model/final_loss": 1.0}
    quality = recorded_quality(metrics, ["model", "second"], captioner=True)
    assert set(quality) == {"model", "second", "captioner"}
    with pytest.raises(QualityGateError, match=r"second has zeroshot/colour_shape/top1 = 0\.400, below the "
                                               r"threshold 0\.85"):
        check_gate(quality, QualityGateConfig(min_colour_shape=0.85, min_caption_shape=0.85))
    with pytest.raises(QualityGateError, match=r"captioner has captions/shape = 0\.200"):
        check_gate(quality, QualityGateConfig(min_colour_shape=0.3, min_caption_shape=0.85))
    check_gate(quality, QualityGateConfig(min_colour_shape=0.3, min_caption_colour=0.9))  # shape not checked
    check_gate(recorded_quality(metrics, ["model"], captioner=False), QualityGateConfig(min_colour_shape=0.85))


def test_reinforce_stops_at_the_gate_before_any_shard(root, val_dir, capsys):
    """The real command: the teacher directory's recorded quality is below the gate, exit 2, one line, no output."""
    teacher_dir = root / "teacher-dir"
    make_coca_dir(teacher_dir / "model", tiny_coca())
    (teacher_dir / "metrics.json").write_text(json.dumps({"quality/model/zeroshot/colour_shape/top1": 0.1,
                                                          "quality/captioner/captions/colour": 1.0,
                                                          "quality/captioner/captions/shape": 1.0}))
    params = root / "params.yaml"
    params.write_text("teacher:\n  second: null\n  gate: {min_colour_shape: 0.5}\n")
    out = root / "reinforced" / "train"
    code = cli.main(["reinforce", "--params", str(params), "--data", str(val_dir), "--teacher", str(teacher_dir),
                     "--out", str(out), "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "teacher.gate: model has zeroshot/colour_shape/top1 = 0.100, below the threshold 0.5" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------- captioning CLIP teacher
@pytest.fixture(scope="module")
def captioning(root, val_dir):
    from lightclip_core.reinforce import coca_teacher as ct

    c = tiny_coca(kind="captioning_clip", tower="mobilenetv2_050", output_stride=16, embed_dim=32, text_width=32,
                  steps=25, lr=3e-3, max_vocab=64)
    return c, ct.train_coca_teacher(c, val_dir, root / "captioning", (0.5,) * 3, (0.25,) * 3, device="cpu")


def test_captioning_clip_publishes_a_dilated_open_clip_teacher_and_a_captioner_sharing_its_trunk(captioning, root):
    from lightclip_core.reinforce import coca_teacher as ct

    c, result = captioning
    teacher = Teacher(TeacherSpec(model=f"local-dir:{result.model_dir}"), root / "cache", torch.device("cpu"))
    trunk = teacher.model.visual.trunk
    assert trunk.feature_info[-1]["reduction"] == 16  # the last stage dilated, not strided
    captioner = Captioner(TeacherSpec(model=f"local-dir:{result.model_dir.parent / ct.CAPTIONER_DIR}"), root, "cpu")
    for name, tensor in trunk.state_dict().items():
        torch.testing.assert_close(captioner.decoder_model.trunk.state_dict()[name], tensor, atol=0, rtol=0)
    rows = list(csv_rows(result.log_path))
    # the decoder learns: the last five steps' mean well below the first step's (one batch's loss is noisy, and the
    # 25 steps end 0.70x on one CPU and lower on another, so a single last step against 0.7 was on the edge)
    last = sum(float(r["caption_loss"]) for r in rows[-5:]) / 5
    assert last < 0.75 * float(rows[0]["caption_loss"])


def test_captioning_decoder_sampling_step_equals_its_full_forward_pass(captioning, root):
    from lightclip_core.reinforce import coca_teacher as ct

    _, result = captioning
    captioner = Captioner(TeacherSpec(model=f"local-dir:{result.model_dir.parent / ct.CAPTIONER_DIR}"), root, "cpu")
    model = captioner.decoder_model
    tokens = open_clip.tokenize(["a red square on the left", "a blue circle"], 12)
    with torch.inference_mode():
        memory = model.encode(torch.randn(2, 3, 32, 32))
        full = model.decoder(model.decoder.to_reduced[tokens], memory)
        for length in (1, 4):
            step = model.next_logits(tokens[:, :length], memory)
            kept = torch.isfinite(step)
            assert int(kept.sum(1)[0]) == len(model.decoder.vocab) - 1  # every known token but the placeholder
            torch.testing.assert_close(step[:, model.decoder.to_token[1:]], full[:, length - 1, 1:])
    captions = captioner.generate(torch.randn(3, 3, 32, 32), 2, 0.9, 1.0, 10, torch.Generator().manual_seed(0))
    assert [len(c) for c in captions] == [2, 2, 2] and all(isinstance(t, str) for c in captions for t in c)


def test_caption_vocabulary_keeps_the_most_frequent_tokens():
    from lightclip_core.models.tokenizer import special_token_ids, tokenize
    from lightclip_core.reinforce.caption_decoder import caption_vocabulary

    captions = ["a red square.", "a red circle.", "a red square on the left."]
    vocab = caption_vocabulary(captions, 16, max_vocab=5)
    special = special_token_ids()
    a, red, full_stop = (int(tokenize(w, 16)[0, 1]) for w in ("a", "red", "."))
    assert vocab[:3] == [-1, special["sot"], special["eot"]]  # placeholder, start, end: always there
    assert len(vocab) == 5 and set(vocab[3:]) <= {a, red, full_stop}  # two of the three tokens seen 3 times


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)
