"""The reinforce stage: DataCompDR shards whose stored embeddings are the teachers' embeddings of the replayed views,
resumable per shard, fan-out by shard range, and a trainer that distils from them; bad inputs stop with one line."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from lightclip_core.cli import main
from lightclip_core.config import Config
from lightclip_core.data.augment import OP_NAMES, AugParams
from lightclip_core.data.prepare import prepare
from lightclip_core.data.reinforced import decode_reinforcement
from lightclip_core.data.shards import iter_raw_samples, read_manifest, shard_paths, verify_shards
from lightclip_core.reinforce.coca_teacher import train_coca_teacher
from lightclip_core.reinforce.reinforcement import ShardReinforcer, default_specs, reinforce
from lightclip_core.reinforce.teachers import TeacherEnsemble
from lightclip_core.train.trainer import train

TEACHER = {"embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
           "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2, "decoder_layers": 1,
           "context_length": 16, "steps": 3, "batch_size": 16, "warmup_steps": 1}
SECOND = {"kind": "clip", "tower": "resnet18", "embed_dim": 16, "image_size": 32, "text_width": 32,
          "text_layers": 1, "text_heads": 2, "context_length": 16, "steps": 3, "batch_size": 16, "warmup_steps": 1}
TINY = {
    "data": {"samples_per_shard": 16, "synthetic": {"num_train": 40, "num_val": 4, "num_test": 4, "image_size": 32}},
    "model": {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 2}},
    "objectives": {"token": {"enabled": False}, "mlm": {"enabled": False}},
    "teacher": {"train": TEACHER, "second": SECOND},
    "reinforce": {"num_augmentations": 3, "num_captions": 2, "max_caption_tokens": 6, "batch_size": 8},
    "train": {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "workers": 0, "shuffle_buffer": 8, "threads": 1},
    "tracking": {"enabled": False},
}


def config(**sections: dict) -> Config:
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return Config.model_validate(raw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-shard training split (16 + 16 + 8 samples) and a tiny trained CoCa teacher."""
    root = tmp_path_factory.mktemp("reinforce")
    cfg = config()
    prepare(cfg.data, root / "data")
    for name, teacher in (("model", cfg.teacher.train), ("second", cfg.teacher.second)):
        train_coca_teacher(teacher, root / "data" / "train", root / "teacher", cfg.model.image.mean,
                           cfg.model.image.std, name=name)
    return root


@pytest.fixture(scope="module")
def reinforced(base):
    out = base / "reinforced" / "train"
    result = reinforce(config(), base / "data" / "train", out, base / "teacher")
    return out, result


def test_every_shard_is_published_in_the_datacompdr_layout(base, reinforced):
    out, result = reinforced
    manifest = read_manifest(out)
    source = read_manifest(base / "data" / "train")
    assert result.complete and manifest["reinforcement"]["complete"]
    assert [s["url"] for s in manifest["shards"]] == [s["url"] for s in source["shards"]]
    assert manifest["num_samples"] == source["num_samples"] == 40
    assert manifest["tasks"] == source["tasks"]
    verify_shards(out)
    r = manifest["reinforcement"]
    assert r["dims"] == [32, 16] and len(r["teachers"]) == 2 and r["image_size"] == 32 and r["num_augmentations"] == 3
    assert r["params"]["ops"] == config().reinforce.ops
    pool = {OP_NAMES.index(name) for name in config().reinforce.ops}  # the configured pool, as table indices
    for raw in iter_raw_samples(shard_paths(out)):
        rf = decode_reinforcement(raw)
        assert {k for entry in rf.param_aug for k, _ in AugParams.from_json(entry).ops} <= pool
        assert rf.image_emb.shape == (3, 48) and rf.syn_text_emb.shape == (2, 48) and len(rf.syn_texts) == 2
        assert all("." not in t for t in rf.syn_texts)
        assert {"png", "txt", "json", "paug.json", "syn.json", "npz"} <= set(raw)
        for piece in (rf.image_emb[:, :32], rf.image_emb[:, 32:], rf.text_emb[:, :32], rf.syn_text_emb[:, 32:]):
            assert np.allclose(np.linalg.norm(piece, axis=1), 1.0, atol=2e-3)  # each teacher's slice L2-normalised


def test_stored_embeddings_are_the_teachers_embeddings_of_the_replayed_views(base, reinforced):
    """Independent recomputation: replay a stored parameter set on the original image and embed it again."""
    out, _ = reinforced
    cfg = config()
    specs, captioner_spec = default_specs(cfg, base / "teacher")
    ensemble = TeacherEnsemble(specs, base / "cache", torch.device("cpu"))
    raw = next(iter(iter_raw_samples(shard_paths(out)[1:])))
    rf = decode_reinforcement(raw)
    from lightclip_core.data.augment import ReplayableAugment
    from lightclip_core.data.shards import decode_image

    image = decode_image(raw)
    for a, entry in enumerate(rf.param_aug):
        view = ReplayableAugment(32).apply(image, AugParams.from_json(entry), size=32, reference_size=32)
        expected = ensemble.encode_images([ensemble.to_tensor(view, t)[None] for t in range(2)]).float().numpy()[0]
        np.testing.assert_allclose(rf.image_emb[a], expected, atol=2e-3)  # fp16 storage
    texts = [raw["txt"].decode(), *rf.syn_texts]
    expected = ensemble.encode_texts(texts).float().numpy()
    np.testing.assert_allclose(np.concatenate([rf.text_emb, rf.syn_text_emb]), expected, atol=2e-3)


def test_a_rerun_redoes_only_missing_shards_and_a_crash_leaves_no_partial_shard(base, tmp_path, monkeypatch):
    cfg = config()
    out = tmp_path / "train"
    first = reinforce(cfg, base / "data" / "train", out, base / "teacher", shard_range=range(0, 1))
    assert not first.complete and read_manifest(out)["reinforcement"]["missing_shards"] == 2
    assert [s["url"] for s in read_manifest(out)["shards"]] == ["train-000000.tar"]
    done = (out / "train-000000.tar").stat()

    calls = []
    original = ShardReinforcer.shard

    def crash_on_the_last(self, src, dst, seed_key, bar):
        calls.append(Path(src).name)
        if Path(src).name == "train-000002.tar":
            raise RuntimeError("killed")
        return original(self, src, dst, seed_key, bar)

    monkeypatch.setattr(ShardReinforcer, "shard", crash_on_the_last)
    with pytest.raises(RuntimeError, match="killed"):
        reinforce(cfg, base / "data" / "train", out, base / "teacher")
    assert calls == ["train-000001.tar", "train-000002.tar"]
    assert not (out / "train-000002.tar").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    calls.clear()
    monkeypatch.setattr(ShardReinforcer, "shard", original)
    again = reinforce(cfg, base / "data" / "train", out, base / "teacher")
    assert again.complete and again.shards_written == 1 and again.shards_reused == 2
    assert (out / "train-000000.tar").stat().st_mtime_ns == done.st_mtime_ns

    changed = reinforce(config(reinforce={**TINY["reinforce"], "num_captions": 1}), base / "data" / "train", out,
                        base / "teacher")
    assert changed.shards_written == 3  # new parameters: every shard's fingerprint changed
    assert decode_reinforcement(next(iter(iter_raw_samples(shard_paths(out))))).num_synthetic == 1


def test_an_undecodable_image_is_skipped_and_counted(base, tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    manifest = read_manifest(base / "data" / "train")
    with tarfile.open(base / "data" / "train" / manifest["shards"][2]["url"]) as tar:
        tar.extractall(tmp_path / "members", filter="data")
    first_png = sorted((tmp_path / "members").glob("*.png"))[0]
    first_png.write_bytes(b"not an image")
    with open(src / "train-000000.tar", "wb") as f:
        sink = wds.TarWriter(f)
        for raw in iter_raw_samples([str(base / "data" / "train" / manifest["shards"][2]["url"])]):
            sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            if raw["__key__"] == first_png.name.split(".")[0]:
                sample["png"] = b"not an image"
            sink.write(sample)
        sink.close()
    from lightclip_core.infra.storage import sha256_file, write_json_atomic

    write_json_atomic(src / "manifest.json", {**manifest, "num_samples": 8, "shards": [
        {"url": "train-000000.tar", "num_samples": 8, "sha256": sha256_file(src / "train-000000.tar")}]})
    cfg = config(data={**TINY["data"], "max_skip_fraction": 0.2})  # 1 of 8: above the default 1%
    result = reinforce(cfg, src, tmp_path / "out", base / "teacher")
    assert result.skipped == {"undecodable_image": 1} and result.samples == 7
    assert read_manifest(tmp_path / "out")["skipped"]["undecodable_image"] == 1
    assert read_manifest(tmp_path / "out")["num_samples"] == 7


def test_the_trainer_distils_from_a_reinforced_split(reinforced, tmp_path):
    out, _ = reinforced
    both = {"contrastive": {"enabled": False}, "distill": {"caption_batches": "both"}}  # a KD term per caption batch
    result = train(config(objectives={**TINY["objectives"], **both}), out, tmp_path)
    header = result.train_log.read_text().splitlines()[0].split(",")
    assert {"distill_loss", "distill_kd_real", "distill_kd_syn"} <= set(header)
    assert result.steps == 3 and np.isfinite(result.metrics["final_loss"])


def test_plain_clip_on_a_reinforced_split_sees_the_stored_views_unless_told_otherwise(reinforced, base):
    """train.stored_views: with distillation off, the batches of a reinforced split are the stored views (the same
    augmentation a distilled run sees); false, or a plain split: the original images."""
    from torchvision.transforms import functional as TF

    from lightclip_core.data.augment import AugParams, ReplayableAugment
    from lightclip_core.data.reinforced import decode_reinforcement
    from lightclip_core.data.shards import decode_image, iter_raw_samples, shard_paths
    from lightclip_core.train.data import PairDecoder, ReinforcedDecoder, make_loader

    out, _ = reinforced
    plain = {"distill": {"enabled": False}}
    loader, _ = make_loader(config(objectives={**TINY["objectives"], **plain}), out)
    assert isinstance(loader.dataset.decode, ReinforcedDecoder)
    off = config(objectives={**TINY["objectives"], **plain}, train={**TINY["train"], "stored_views": False})
    assert type(make_loader(off, out)[0].dataset.decode) is PairDecoder
    assert type(make_loader(config(objectives={**TINY["objectives"], **plain}), base / "data" / "train")[0]
                .dataset.decode) is PairDecoder
    decoder = loader.dataset.decode
    raw = next(iter_raw_samples(shard_paths(out)[:1]))
    r = decode_reinforcement(raw)
    views = [ReplayableAugment(decoder.size).apply(decode_image(raw), AugParams.from_json(p), size=decoder.size,
                                                    reference_size=decoder.reference_size) for p in r.param_aug]
    image = decoder(raw)["images"]
    assert any(torch.equal(image, TF.normalize(TF.to_tensor(v), decoder.mean, decoder.std)) for v in views)


def test_distillation_on_a_plain_split_is_a_one_line_error(base, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(TINY))
    code = main(["train", "--params", str(params), "--data", str(base / "data" / "train"), "--out",
                 str(tmp_path / "t")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "objectives.distill.enabled" in err[0] and "reinforce" in err[0]


def test_a_width_that_disagrees_with_the_manifest_or_missing_keys_stop_with_one_line(reinforced, tmp_path, capsys):
    out, _ = reinforced
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["reinforcement"]["dims"] = [32, 12]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(TINY))
    code = main(["train", "--params", str(params), "--data", str(broken), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "width 48" in err[0] and "44" in err[0]

    plain_members = tmp_path / "plain"
    shutil.copytree(out, plain_members)
    for shard in shard_paths(plain_members):
        with open(shard + ".new", "wb") as f:
            sink = wds.TarWriter(f)
            for raw in iter_raw_samples([shard]):
                sink.write({k: v for k, v in raw.items() if k in ("__key__", "png", "txt", "json", "npz")})
            sink.close()
        Path(shard + ".new").replace(shard)
    code = main(["train", "--params", str(params), "--data", str(plain_members), "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "paug.json" in err[0]


def test_bad_shard_range_and_bad_teacher_are_one_line_errors(base, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(TINY))
    code = main(["reinforce", "--params", str(params), "--data", str(base / "data" / "train"), "--teacher",
                 str(base / "teacher"), "--out", str(tmp_path / "o"), "--shards", "1-2"])
    assert code == 2 and "--shards" in capsys.readouterr().err
    broken = tmp_path / "teacher"
    (broken / "model").mkdir(parents=True)
    (broken / "model" / "open_clip_config.json").write_text((base / "teacher" / "model" / "open_clip_config.json")
                                                            .read_text())
    (broken / "model" / "open_clip_model.safetensors").write_bytes(b"\x00" * 64)
    code = main(["reinforce", "--params", str(params), "--data", str(base / "data" / "train"), "--teacher",
                 str(broken), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "local-dir" in err[0]


def _write_published_layout(src: Path, dst: Path) -> None:
    """Our reinforced shards rewritten as DataCompDR publishes them: `pth.gz` (gzip of torch.save, bf16) with the
    separate text-embedding layout, `paug.json` holding a JSON string, and no manifest."""
    import gzip
    import io

    dst.mkdir()
    for shard in shard_paths(src):
        with open(dst / Path(shard).name, "wb") as f:
            sink = wds.TarWriter(f, encoder=False)
            for raw in iter_raw_samples([shard]):
                r = decode_reinforcement(raw)
                buffer = io.BytesIO()
                torch.save({"image_emb": torch.from_numpy(r.image_emb).bfloat16(),
                            "text_emb": torch.from_numpy(r.text_emb).bfloat16(),
                            "syn_text_emb": torch.from_numpy(r.syn_text_emb).bfloat16()}, buffer)
                sink.write({"__key__": raw["__key__"], "png": raw["png"], "txt": raw["txt"], "json": raw["json"],
                            "paug.json": json.dumps({"param_aug": json.dumps(r.param_aug)}).encode(),
                            "syn.json": json.dumps({"syn_text": r.syn_texts}).encode(),
                            "pth.gz": gzip.compress(buffer.getvalue())})
            sink.close()


def test_published_datacompdr_shards_are_indexed_and_trained_on(reinforced, tmp_path, capsys):
    out, _ = reinforced
    published = tmp_path / "published"
    _write_published_layout(out, published)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(TINY))
    base = ["index-reinforced", "--params", str(params), "--data", str(published), "--scales", "50", "20",
            "--image-size", "32"]
    assert main([*base, "--dims", "32", "8"]) == 1  # the shards hold 32 + 16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width 48" in err[0] and "40" in err[0]
    assert not (published / "manifest.json").exists()
    assert main([*base, "--dims", "32", "16"]) == 0
    manifest = read_manifest(published)
    assert manifest["num_samples"] == 40 and manifest["reinforcement"]["dims"] == [32, 16]
    verify_shards(published)
    result = train(config(), published, tmp_path / "train")
    assert result.steps == 3 and "distill_loss" in result.train_log.read_text().splitlines()[0]


def test_distillation_scales_come_from_the_manifest_unless_overridden_one_for_all_or_one_each():
    from lightclip_core.config import ConfigError
    from lightclip_core.losses.objective import build_objectives
    from lightclip_core.models import build_model

    reinforcement = {"dims": [32, 16], "scales": [13.5, 14.0]}
    cfg = config()
    model = build_model(cfg.model)
    assert build_objectives(cfg, model, reinforcement)[-1].scales == [13.5, 14.0]
    override = config(objectives={**TINY["objectives"], "distill": {"teacher_scales": [100.0, 50.0]}})
    assert build_objectives(override, model, reinforcement)[-1].scales == [100.0, 50.0]
    one_for_all = config(objectives={**TINY["objectives"], "distill": {"teacher_scales": [100.0]}})
    assert build_objectives(one_for_all, model, reinforcement)[-1].scales == [100.0, 100.0]
    wrong = config(objectives={**TINY["objectives"], "distill": {"teacher_scales": [100.0, 50.0, 70.0]}})
    with pytest.raises(ConfigError, match="objectives.distill.teacher_scales"):
        build_objectives(wrong, model, reinforcement)
    with pytest.raises(ConfigError, match="2 teachers"):  # only a scale the user gives is spread over the teachers
        build_objectives(cfg, model, {"dims": [32, 16], "scales": [13.5]})
    with pytest.raises(ConfigError, match="not reinforced"):
        build_objectives(cfg, model, None)


def test_configured_teachers_need_no_trained_teacher_directory(base, tmp_path, capsys):
    """With teacher.ensemble and teacher.captioner set (as for pretrained models), --teacher is not read."""
    raw = json.loads(json.dumps(TINY))
    raw["teacher"]["ensemble"] = [{"model": f"local-dir:{base / 'teacher' / 'second'}", "logit_scale": 100.0}]
    raw["teacher"]["captioner"] = {"model": f"local-dir:{base / 'teacher' / 'model'}"}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(raw))
    args = ["reinforce", "--params", str(params), "--data", str(base / "data" / "train"), "--out",
            str(tmp_path / "out"), "--shards", "2:3"]
    assert main([*args, "--teacher", str(tmp_path / "absent")]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["reinforcement"]["dims"] == [16] and manifest["reinforcement"]["scales"] == [100.0]
    assert [s["url"] for s in manifest["shards"]] == ["train-000002.tar"] and not manifest["reinforcement"]["complete"]
    params.write_text(json.dumps(TINY))  # the trained teachers are needed, and their directory is missing
    capsys.readouterr()
    assert main([*args, "--teacher", str(tmp_path / "absent")]) == 2
    assert "--teacher" in capsys.readouterr().err
