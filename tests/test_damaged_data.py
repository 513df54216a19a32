"""Damaged data (issue #18): a tar shard cut at any byte, garbage, a missing shard, a corrupt image inside a prepared
shard, samples without their image or caption, and manifests that point outside their dataset. Every reader skips
what it cannot use and counts it per reason, checked here against the byte layout of the intact tar; a shard whose
sha256 differs from its manifest has each sample validated (the verdict hashed once per process); training completes
over a bad sample and reports it; past `data.max_skip_fraction` a stage stops with one line."""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds

from lightclip_core.cli import main
from lightclip_core.config import Config, DataConfig
from lightclip_core.data.prepare import prepare
from lightclip_core.data.shards import (CHECKSUMS, ShardRef, ShardSetWriter, ShardStream, check_shard_url,
                                        decode_image, decoded, iter_raw_samples, read_manifest, shard_refs)
from lightclip_core.data.skips import DataError, SkipTally
from lightclip_core.data.synthetic import make_sample
from lightclip_core.infra.storage import write_json_atomic
from lightclip_core.train.data import DataPosition, StepBatches, make_loader
from lightclip_core.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 10


# ------------------------------------------------------------------------------------------------ helpers
def write_split(root: Path, n: int = 2 * PER_SHARD, size: int = 16) -> dict[str, Any]:
    writer = ShardSetWriter(root, "train", PER_SHARD)
    for i in range(n):
        writer.write(make_sample(0, "train", i, size, 0.2))
    return writer.close({"source": "synthetic"})


def keys_of(tally: SkipTally, root: Path) -> list[str]:
    return [raw["__key__"] for raw in iter_raw_samples(shard_refs(root), tally)]


def layout(path: Path) -> list[tuple[str, int, int]]:
    """(member name, where its header starts, where its data ends) of an intact tar, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data + m.size) for m in tar.getmembers()]


def end_of_members(path: Path) -> int:
    """Where the end-of-archive block of an intact tar starts."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        return tar.offset if members else 0


def expected_after_cut(path: Path, cut: int) -> list[str]:
    """The samples a reader may keep from `path` cut at byte `cut`, from the intact layout alone: those whose members
    all end before the cut and whose end the reader can tell, because a later sample's member header is complete
    (a data byte of it is at or before the cut) or the end-of-archive block begins before the cut."""
    with tarfile.open(path) as tar:
        members = [(m.name.split(".")[0], m.offset_data, m.offset_data + m.size) for m in tar.getmembers()]
    ends: dict[str, int] = {}
    for key, _, end in members:
        ends[key] = max(ends.get(key, 0), end)
    kept = []
    for key, end in ends.items():
        later = [data for k, data, _ in members if k > key]
        told = (cut > end_of_members(path)) if not later else min(later) <= cut
        if end <= cut and told:
            kept.append(key)
    return kept


def rewrite(path: Path, change) -> None:
    """Rewrite a shard sample by sample through `change(sample) -> sample | None`; the manifest is left alone, so its
    sha256 no longer matches."""
    raws = list(iter_raw_samples([str(path)], require=()))
    with open(path, "wb") as f:
        sink = wds.TarWriter(f, mtime=0.0)
        for raw in raws:
            sample = change({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
            if sample is not None:
                sink.write(sample)
        sink.close()


def truncated_png(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "png": sample["png"][: len(sample["png"]) // 2]}


@pytest.fixture()
def in_process_cli(tmp_path: Path, monkeypatch):
    """`main` in this process: its log file in tmp_path, and the root logger's handlers restored afterwards."""
    import logging

    monkeypatch.setenv("LIGHTCLIP_LOG_DIR", str(tmp_path / "logs"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logging.captureWarnings(False)


@pytest.fixture()
def split(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "train"
    return root, write_split(root)


# ------------------------------------------------------------------------------------------------ tar damage
def test_intact_split_reads_every_sample_and_counts_nothing(split) -> None:
    root, manifest = split
    tally = SkipTally()
    assert len(keys_of(tally, root)) == 2 * PER_SHARD
    assert tally.seen == 2 * PER_SHARD and tally.skipped == {} and not tally.shards


def test_a_shard_cut_at_any_byte_keeps_exactly_the_whole_samples_before_the_cut(split) -> None:
    """Every 512-byte boundary (a cut tarfile alone reads as a clean end) and offsets inside blocks."""
    root, manifest = split
    first = root / manifest["shards"][0]["url"]
    intact = first.read_bytes()
    second = [raw["__key__"] for raw in iter_raw_samples([str(root / manifest["shards"][1]["url"])])]
    cuts = sorted({*range(0, len(intact), 512), *range(1, len(intact), 1531), len(intact) - 1, len(intact)})
    reference = root.parent / "intact.tar"
    reference.write_bytes(intact)
    for cut in cuts:
        first.write_bytes(intact[:cut])
        tally = SkipTally()
        kept = expected_after_cut(reference, cut)
        assert keys_of(tally, root) == kept + second, cut
        lost = PER_SHARD - len(kept)
        assert tally.seen == 2 * PER_SHARD, cut
        assert tally.skipped == ({"truncated_shard": lost} if lost else {}), cut
        damaged = cut < len(intact) and lost > 0
        assert tally.shards == ({"checksum_mismatch": 1, "truncated": 1} if damaged else
                                {"checksum_mismatch": 1} if cut < len(intact) else {}), cut
    assert any(expected_after_cut(reference, c) for c in cuts) and not expected_after_cut(reference, 512)


def test_the_half_cut_last_sample_is_never_kept_without_its_json(split) -> None:
    """The hostile tester's case: the cut falls between a sample's members; the sample is counted, not kept."""
    root, manifest = split
    first = root / manifest["shards"][0]["url"]
    members = layout(first)
    png_of_sample_3 = next(end for name, _, end in members if name.endswith(".png") and "00000003" in name)
    first.write_bytes(first.read_bytes()[:png_of_sample_3 + (-png_of_sample_3 % 512)])  # json and png, no txt
    tally = SkipTally()
    raws = list(iter_raw_samples(shard_refs(root), tally))
    assert [r["__key__"] for r in raws][:3] == ["train-00000000", "train-00000001", "train-00000002"]
    assert "train-00000003" not in [r["__key__"] for r in raws]
    assert all({"png", "txt", "json"} <= set(r) for r in raws)
    assert tally.skipped == {"truncated_shard": PER_SHARD - 3}


@pytest.mark.parametrize("content", ["garbage", "empty", "zeros", "missing"])
def test_a_garbage_empty_or_missing_shard_loses_its_manifest_count(split, content: str) -> None:
    root, manifest = split
    first = root / manifest["shards"][0]["url"]
    if content == "missing":
        first.unlink()
    else:
        size = len(first.read_bytes())
        first.write_bytes({"garbage": random.Random(0).randbytes(size), "empty": b"", "zeros": bytes(size)}[content])
    tally = SkipTally()
    keys = keys_of(tally, root)
    assert len(keys) == PER_SHARD and keys[0] == "train-00000010"  # the second shard, whole
    assert tally.seen == 2 * PER_SHARD
    if content == "missing":
        assert tally.skipped == {"missing_shard": PER_SHARD} and tally.shards == {"missing": 1}
    elif content == "zeros":  # an all-zero file reads as an empty archive: it lacks every sample its manifest lists
        assert tally.skipped == {"truncated_shard": PER_SHARD} and tally.shards == {"checksum_mismatch": 1}
    else:
        assert tally.skipped == {"truncated_shard": PER_SHARD}
        assert tally.shards == {"checksum_mismatch": 1, "truncated": 1}


def test_without_a_manifest_a_damaged_tar_counts_one_lost_sample(split) -> None:
    """Ingestion reads tars with no manifest: the damage is counted once, the samples before it are kept."""
    root, manifest = split
    first = root / manifest["shards"][0]["url"]
    members = layout(first)
    first.write_bytes(first.read_bytes()[:members[13][2] - 7])  # inside sample 4's png
    tally = SkipTally()
    keys = [raw["__key__"] for raw in iter_raw_samples([str(first)], tally)]
    assert keys == [f"train-{i:08d}" for i in range(4)]
    assert tally.seen == 5 and tally.skipped == {"truncated_shard": 1} and tally.shards == {"truncated": 1}


def test_samples_missing_a_member_are_skipped_per_reason(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    png = make_sample(0, "train", 0, 16, 0.0).image
    members = [("a.png", png), ("a.txt", b"ok"), ("b.txt", b"no image"), ("c.png", png), ("c.json", b"{}"),
               ("d.png", png), ("d.txt", b"one"), ("d.txt", b"two"), ("e.PNG", png), ("e.txt", b"upper case")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tally = SkipTally()
    assert [raw["__key__"] for raw in iter_raw_samples([str(path)], tally)] == ["a", "e"]
    assert tally.seen == 5
    assert tally.skipped == {"duplicate_member": 1, "missing_caption": 1, "missing_image": 1}


# ------------------------------------------------------------------------------------------------ checksums
def test_a_corrupt_image_in_a_shard_with_a_stale_checksum_is_found_by_validation(split) -> None:
    root, manifest = split
    rewrite(root / manifest["shards"][1]["url"],
            lambda s: truncated_png(s) if s["__key__"] == "train-00000013" else s)
    tally = SkipTally()
    keys = keys_of(tally, root)
    assert keys == [f"train-{i:08d}" for i in range(2 * PER_SHARD) if i != 13]
    assert tally.skipped == {"undecodable_image": 1} and tally.shards == {"checksum_mismatch": 1}
    assert tally.seen == 2 * PER_SHARD


def test_a_corrupt_image_under_a_matching_checksum_is_skipped_by_the_decoder(split) -> None:
    """The damage was there when the manifest was written: the reader yields it, decoding skips and counts it."""
    root, manifest = split
    shard = root / manifest["shards"][1]["url"]
    rewrite(shard, lambda s: truncated_png(s) if s["__key__"] == "train-00000013" else s)
    from lightclip_core.infra.storage import sha256_file

    manifest["shards"][1]["sha256"] = sha256_file(shard)
    write_json_atomic(root / "manifest.json", manifest)
    tally = SkipTally()
    images = list(decoded(iter_raw_samples(shard_refs(root), tally), decode_image, tally))
    assert len(images) == 2 * PER_SHARD - 1
    assert tally.skipped == {"undecodable_image": 1} and not tally.shards
    assert "train-00000013" in tally.first["undecodable_image"]


def test_the_checksum_verdict_is_hashed_once_per_shard_per_process(split, monkeypatch) -> None:
    import lightclip_core.data.reader as reader

    root, manifest = split
    hashed: list[str] = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    CHECKSUMS.clear()
    for _ in range(3):
        keys_of(SkipTally(), root)
    assert sorted(hashed) == sorted(s["url"] for s in manifest["shards"])
    rewrite(root / manifest["shards"][0]["url"], lambda s: s if s["__key__"] != "train-00000002" else None)
    tally = SkipTally()
    keys_of(tally, root)  # a changed file is hashed again, and found different
    assert hashed.count(manifest["shards"][0]["url"]) == 2
    assert tally.shards == {"checksum_mismatch": 1} and tally.skipped == {"truncated_shard": 1}


# ------------------------------------------------------------------------------------------------ the streams
def key_of(raw: dict[str, Any]) -> str:
    decode_image(raw)  # a sample whose image does not decode is the stream's to skip
    return raw["__key__"]


@pytest.mark.parametrize("cut", [512 * 20, 512 * 20 + 77, 300])
def test_the_training_stream_yields_what_the_reader_keeps_and_counts_the_rest(split, cut: int) -> None:
    root, manifest = split
    first = root / manifest["shards"][0]["url"]
    reference = root.parent / "intact.tar"
    reference.write_bytes(first.read_bytes())
    first.write_bytes(reference.read_bytes()[:cut])
    rewrite(root / manifest["shards"][1]["url"], lambda s: truncated_png(s) if s["__key__"] == "train-00000015" else s)
    stream = ShardStream(shard_refs(root), key_of, shuffle=False)
    kept = expected_after_cut(reference, cut)
    assert list(stream) == kept + [f"train-{i:08d}" for i in range(PER_SHARD, 2 * PER_SHARD) if i != 15]
    assert stream.tally.skipped == {"truncated_shard": PER_SHARD - len(kept), "undecodable_image": 1}
    assert stream.tally.shards == {"checksum_mismatch": 2, "truncated": 1}


TRAIN = {
    "data": {"samples_per_shard": 32, "synthetic": {"num_train": 128, "num_val": 4, "num_test": 4, "image_size": 32}},
    "model": {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}},
    "objectives": {"token": {"enabled": False}, "mlm": {"enabled": False}, "distill": {"enabled": False}},
    "train": {"batch_size": 16, "max_steps": 3, "warmup_steps": 1, "checkpoint_every": 100, "workers": 0,
              "shuffle_buffer": 128, "threads": 1},
    "tracking": {"enabled": False},
}


def train_config(**train_fields: Any) -> Config:
    raw = json.loads(json.dumps(TRAIN))
    raw["train"].update(train_fields)
    return Config.model_validate(raw)


@pytest.fixture(scope="module")
def damaged_train(tmp_path_factory) -> Path:
    """A 128-sample training split whose second shard holds one truncated PNG (its sha256 no longer matches)."""
    data = tmp_path_factory.mktemp("damaged")
    prepare(train_config().data, data)
    manifest = read_manifest(data / "train")
    rewrite(data / "train" / manifest["shards"][1]["url"],
            lambda s: truncated_png(s) if s["__key__"] == "train-00000040" else s)
    return data / "train"


@pytest.mark.parametrize("workers", [0, 2])
def test_training_over_a_corrupt_image_completes_and_reports_the_skip(damaged_train, tmp_path, workers) -> None:
    cfg = train_config(workers=workers).model_copy(update={"data": DataConfig(max_skip_fraction=0.05)})
    result = train(cfg, damaged_train, tmp_path)
    assert result.final_checkpoint.is_file() and result.steps == 3
    assert result.metrics["skipped/undecodable_image"] == 1 and result.metrics["skipped/total"] == 1
    assert result.metrics["damaged_shards/checksum_mismatch"] == 1


def test_training_past_the_limit_stops_with_one_line_and_no_final_weights(damaged_train, tmp_path, capsys,
                                                                          in_process_cli) -> None:
    params = tmp_path / "params.json"  # YAML is a superset of JSON
    params.write_text(json.dumps({**TRAIN, "data": {"max_skip_fraction": 0.0}}))
    code = main(["train", "--params", str(params), "--data", str(damaged_train), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("lightclip train: error:")]  # after the log lines
    assert code == 1 and "Traceback" not in err
    assert "undecodable_image=1" in line and "data.max_skip_fraction=0.0" in line
    assert not (tmp_path / "run" / "final.pt").exists()


@pytest.fixture(scope="module")
def undecodable_train(tmp_path_factory, damaged_train) -> Path:
    """The same split with the manifest's sha256 updated: the reader yields the bad sample, the decoder skips it."""
    from lightclip_core.infra.storage import sha256_file

    root = tmp_path_factory.mktemp("undecodable") / "train"
    manifest = read_manifest(damaged_train)
    root.mkdir()
    for shard in manifest["shards"]:
        (root / shard["url"]).write_bytes((damaged_train / shard["url"]).read_bytes())
        shard["sha256"] = sha256_file(root / shard["url"])
    write_json_atomic(root / "manifest.json", manifest)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_with_a_skipped_sample_gives_the_same_batches(undecodable_train, workers) -> None:
    """The position counts the samples each worker's decoder skipped, so resuming continues exactly where it stopped
    (also across the early end of an epoch that a skipped sample shortens), and nothing is counted twice."""
    cfg = train_config(workers=workers, batch_size=8, shuffle_buffer=16)

    def run(position: DataPosition | None, steps: int) -> tuple[list[torch.Tensor], list[DataPosition]]:
        loader, stream = make_loader(cfg, undecodable_train, pin_memory=False)
        data = StepBatches(loader, stream, 1, position)
        out, positions = [], []
        for _ in range(steps):
            out.append(data.next_step()[1][0]["tokens"])
            positions.append(DataPosition.from_state(json.loads(json.dumps(data.position.state_dict()))))
        data._close()
        return out, positions

    steps = 20  # one epoch gives 15 full batches of the 127 usable samples, then the next begins
    straight, positions = run(None, steps)
    assert positions[14].epoch == 0 and positions[15].epoch == 1
    assert positions[14].skips.skipped == {"undecodable_image": 1}
    skipped_at = next(i for i, p in enumerate(positions) if sum(p.worker_skipped))
    for middle in sorted({skipped_at + 1, 14, 16}):
        rest, after = run(positions[middle - 1], steps - middle)
        assert all(torch.equal(a, b) for a, b in zip(straight[middle:], rest, strict=True)), middle
        assert after[-1].state_dict() == positions[-1].state_dict(), middle


# ------------------------------------------------------------------------------------------------ the limit
def test_the_limit_passes_at_the_limit_and_fails_above_it_with_one_line() -> None:
    tally = SkipTally(seen=100)
    tally.skip("undecodable_image", 2, detail="sample 'x' of a.tar: png: OSError: image file is\ntruncated")
    tally.check(0.02, "split s")  # 2 of 100 at a limit of 2%: passes
    with pytest.raises(DataError) as err:
        tally.check(0.0199, "split s")
    message = str(err.value)
    assert "\n" not in message and "undecodable_image=2" in message and "data.max_skip_fraction=0.0199" in message
    assert "image file is truncated" in message
    running = SkipTally(seen=10)
    running.skip("truncated_shard", 5)
    running.check_running(0.01, 1000, "s")  # 5 of an input of 1000: the whole input may still pass
    running.skip("missing_image", 6)
    with pytest.raises(DataError, match="more than data.max_skip_fraction=0.01 of 1000"):
        running.check_running(0.01, 1000, "s")


def test_ingesting_damaged_tars_counts_them_and_holds_the_limit(tmp_path: Path) -> None:
    source = tmp_path / "own"
    manifest = write_split(source, n=3 * PER_SHARD)
    shards = [source / s["url"] for s in manifest["shards"]]
    (source / "manifest.json").unlink()
    shards[0].write_bytes(shards[0].read_bytes()[:layout(shards[0])[13][2] - 7])  # 4 whole samples, then damage
    shards[1].write_bytes(random.Random(1).randbytes(4096))
    cfg = DataConfig(source="webdataset", samples_per_shard=8, max_skip_fraction=0.2,
                     ingest={"path": str(source), "val_fraction": 0.2, "test_fraction": 0.2})
    result = prepare(cfg, tmp_path / "out")
    assert sum(result.counts.values()) == 4 + PER_SHARD
    assert result.skipped == {"truncated_shard": 2}  # one per damaged tar: its sample count is unknown
    assert result.damaged_shards == {"truncated": 2} and result.skip_metrics["skipped/total"] == 2
    with pytest.raises(DataError) as err:
        prepare(cfg.model_copy(update={"max_skip_fraction": 0.1}), tmp_path / "again")
    assert "\n" not in str(err.value) and "truncated_shard=2" in str(err.value)
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------------------------ confinement
@pytest.mark.parametrize("url", ["../x/train-000000.tar", "/etc/passwd", "a/../../x.tar", "./train-000000.tar",
                                 "s3://other-bucket/x.tar", "C:\\x.tar", "a//b.tar", "", None])
def test_a_shard_url_outside_its_dataset_is_refused(split, url) -> None:
    root, manifest = split
    manifest["shards"][1]["url"] = url
    write_json_atomic(root / "manifest.json", manifest)
    with pytest.raises(DataError, match="not a relative path inside the dataset"):
        read_manifest(root)
    with pytest.raises(DataError):
        shard_refs("s3://bucket/prefix/train", manifest)  # an S3 key must stay under the dataset's prefix too
    assert check_shard_url("sub/train-000000.tar", "m") == "sub/train-000000.tar"


def test_a_symlinked_shard_pointing_outside_is_refused_and_one_inside_is_read(split, tmp_path) -> None:
    root, manifest = split
    inside = root / "copy.tar"
    inside.write_bytes((root / manifest["shards"][0]["url"]).read_bytes())
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes((root / manifest["shards"][1]["url"]).read_bytes())
    (root / manifest["shards"][1]["url"]).unlink()
    (root / manifest["shards"][1]["url"]).symlink_to(outside)
    with pytest.raises(DataError, match="outside the dataset directory"):
        shard_refs(root)
    (root / manifest["shards"][1]["url"]).unlink()
    (root / manifest["shards"][1]["url"]).symlink_to(inside.name)
    tally = SkipTally()
    assert keys_of(tally, root) == 2 * [f"train-{i:08d}" for i in range(PER_SHARD)]  # the link holds shard 0's bytes
    assert tally.shards == {"checksum_mismatch": 1} and tally.skipped == {}
    assert [r.path for r in shard_refs(root)] == [str(root / s["url"]) for s in manifest["shards"]]


def test_reinforce_refuses_an_escaping_manifest_before_writing_anything(split, tmp_path, capsys,
                                                                       in_process_cli) -> None:
    root, manifest = split
    manifest["shards"][0]["url"] = "../x/train-000000.tar"
    write_json_atomic(root / "manifest.json", manifest)
    (tmp_path / "teacher").mkdir()
    out = tmp_path / "reinforced"
    code = main(["reinforce", "--params", str(ROOT / "params.yaml"), "--data", str(root), "--out", str(out),
                 "--teacher", str(tmp_path / "teacher"), "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("lightclip reinforce: error:")]
    assert code == 1 and "Traceback" not in err and "../x/train-000000.tar" in line
    assert not out.exists() and not (tmp_path / "x").exists()


def test_shard_refs_carry_the_manifest_counts_and_checksums(split) -> None:
    root, manifest = split
    assert shard_refs(root) == [ShardRef(str(root / s["url"]), s["num_samples"], s["sha256"])
                                for s in manifest["shards"]]
    assert os.path.isfile(shard_refs(root)[0].path)


@pytest.mark.slow
def test_two_ranks_sum_their_skips_and_stop_together_past_the_limit(damaged_train, tmp_path) -> None:
    """Under torchrun each rank counts what it skipped; the limit is judged on their sum, which every rank computes
    from the same gathered counts, so both ranks stop together (no rank waits on a dead one) and nothing is written."""
    import subprocess
    import sys

    def torchrun(limit: float, out: Path) -> subprocess.CompletedProcess:
        params = tmp_path / f"params-{limit}.json"
        params.write_text(json.dumps({**TRAIN, "data": {"max_skip_fraction": limit}}))
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
               "lightclip_core.cli", "train", "--params", str(params), "--data", str(damaged_train), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LIGHTCLIP_LOG_DIR": str(tmp_path)}
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    ok = torchrun(0.05, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["skipped/undecodable_image"] == 1 and metrics["damaged_shards/checksum_mismatch"] == 1
    failed = torchrun(0.0, tmp_path / "failed")
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if "lightclip train: error:" in line]
    # each rank that gets to print says the same line; torchrun may stop the second rank before it prints
    assert failed.returncode != 0 and 1 <= len(errors) <= 2
    assert all("undecodable_image=1" in line and "data.max_skip_fraction=0.0" in line for line in errors)
    assert not (tmp_path / "failed" / "final.pt").exists()
