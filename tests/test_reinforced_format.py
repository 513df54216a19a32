"""DataCompDR reinforcement fields: every published layout written to real tar shards and read back, our writer's
round trip, and the errors of malformed samples."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import webdataset as wds

from lightclip_core.data.reinforced import (REINFORCEMENT_KEYS, Reinforcement, ReinforcementError,
                                            decode_reinforcement, encode_reinforcement, has_reinforcement)
from lightclip_core.data.shards import iter_raw_samples

N_AUG, DIM = 4, 8
SYN = {"syn_text": ["a red cube", "a cube, red"], "syn_text_2": ["red box on a table", "cube", "a red thing"]}


# ------------------------------------------------------------------------------------------------ helpers
def make_truth(seed: int, syn: dict[str, list[str]] = SYN) -> dict[str, Any]:
    """Random float32 embeddings and augmentation parameters of one sample."""
    rng = np.random.default_rng(seed)
    emb = lambda n: rng.standard_normal((n, DIM)).astype(np.float32)  # noqa: E731
    paug = [[[int(v) for v in rng.integers(0, 64, 4)], [[int(rng.integers(0, 14)), float(rng.random())]]]
            for _ in range(N_AUG)]
    return {"paug": paug, "syn": syn, "image_emb": emb(N_AUG), "gt_emb": emb(1),
            "syn_emb": {k: emb(len(v)) for k, v in syn.items()}}


def arrays_of(t: dict[str, Any], layout: str) -> dict[str, np.ndarray]:
    if layout == "combined":
        return {"image_emb": t["image_emb"], "text_emb": np.concatenate([t["gt_emb"], *t["syn_emb"].values()])}
    return {"image_emb": t["image_emb"], "text_emb": t["gt_emb"], **{f"{k}_emb": v for k, v in t["syn_emb"].items()}}


def npz_bytes(arrays: dict[str, np.ndarray], dtype: Any, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **{k: v.astype(dtype) for k, v in arrays.items()})
    return buf.getvalue()


def pth_gz_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return gzip.compress(buf.getvalue(), mtime=0)


def bf16_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v).to(torch.bfloat16) for k, v in arrays.items()}


def as_fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def as_bf16(x: np.ndarray) -> np.ndarray:
    return torch.tensor(x).to(torch.bfloat16).float().numpy()


def base_sample(key: str, t: dict[str, Any]) -> dict[str, Any]:
    return {"__key__": key, "jpg": b"\xff\xd8fake", "txt": b"a red cube", "json": b"{}",
            "paug.json": json.dumps({"param_aug": t["paug"]}).encode(),
            "syn.json": json.dumps({**t["syn"], "other": ["ignored"]}).encode()}


def roundtrip(tmp_path: Path, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    path = tmp_path / "shard-000000.tar"
    with open(path, "wb") as f:
        sink = wds.TarWriter(f, encoder=False, mtime=0.0)
        for s in samples:
            sink.write(s)
        sink.close()
    return list(iter_raw_samples([str(path)], require=()))  # some samples here carry reinforcement fields only


def check(r: Reinforcement, t: dict[str, Any], cast: Callable[[np.ndarray], np.ndarray]) -> None:
    syn_texts = [c for v in t["syn"].values() for c in v]
    assert r.param_aug == t["paug"] and r.syn_texts == syn_texts
    assert (r.num_augmentations, r.num_synthetic, r.dim) == (N_AUG, len(syn_texts), DIM)
    for got, want in ((r.image_emb, t["image_emb"]), (r.text_emb, t["gt_emb"]),
                      (r.syn_text_emb, np.concatenate(list(t["syn_emb"].values())))):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, cast(want))


# ------------------------------------------------------------------------------------------------ published layouts
LAYOUTS = {
    "npz-f32-combined": ("combined", lambda a: {"npz": npz_bytes(a, np.float32)}, lambda x: x),
    "npz-f16-separate": ("separate", lambda a: {"npz": npz_bytes(a, np.float16, compressed=True)}, as_fp16),
    "pth-bf16-combined": ("combined", lambda a: {"pth.gz": pth_gz_bytes(bf16_dict(a))}, as_bf16),
    "pth-bf16-separate": ("separate", lambda a: {"pth.gz": pth_gz_bytes(bf16_dict(a))}, as_bf16),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_published_layouts_decode_from_tar_shards(tmp_path: Path, name: str) -> None:
    layout, members, cast = LAYOUTS[name]
    truths = [make_truth(i) for i in range(3)]
    samples = [{**base_sample(f"s{i:03d}", t), **members(arrays_of(t, layout))} for i, t in enumerate(truths)]
    raws = roundtrip(tmp_path, samples)
    assert [r["__key__"] for r in raws] == ["s000", "s001", "s002"]
    for raw, t in zip(raws, truths):
        assert has_reinforcement(raw)
        check(decode_reinforcement(raw), t, cast)


PAUG_VARIANTS: dict[str, Callable[[list], str]] = {
    "dict": lambda p: json.dumps({"param_aug": p}),
    "dict-string-value": lambda p: json.dumps({"param_aug": json.dumps(p)}),
    "bare-list": lambda p: json.dumps(p),
    "json-string-of-dict": lambda p: json.dumps(json.dumps({"param_aug": p})),
    "json-string-of-list": lambda p: json.dumps(json.dumps(p)),
}


@pytest.mark.parametrize("variant", sorted(PAUG_VARIANTS))
def test_param_aug_variants(tmp_path: Path, variant: str) -> None:
    t = make_truth(7)
    sample = {**base_sample("k", t), "paug.json": PAUG_VARIANTS[variant](t["paug"]).encode(),
              "npz": npz_bytes(arrays_of(t, "combined"), np.float32)}
    (raw,) = roundtrip(tmp_path, [sample])
    check(decode_reinforcement(raw), t, lambda x: x)


def test_npz_wins_over_pth_gz(tmp_path: Path) -> None:
    t, decoy = make_truth(1), make_truth(2)
    sample = {**base_sample("both", t), "npz": npz_bytes(arrays_of(t, "combined"), np.float32),
              "pth.gz": pth_gz_bytes(bf16_dict(arrays_of(decoy, "combined")))}
    (raw,) = roundtrip(tmp_path, [sample])
    check(decode_reinforcement(raw), t, lambda x: x)


def test_json_members_may_be_str_and_other_keys_are_ignored() -> None:
    t = make_truth(3)
    raw = {k: v.decode() if k.endswith("json") else v for k, v in base_sample("str", t).items() if k != "__key__"}
    raw["npz"] = npz_bytes(arrays_of(t, "separate"), np.float32)
    check(decode_reinforcement(raw, key="str"), t, lambda x: x)


# ------------------------------------------------------------------------------------------------ our writer
@pytest.mark.parametrize("dtype,cast", [("float16", as_fp16), ("float32", lambda x: x)])
def test_encoder_roundtrip_through_a_tar_shard(tmp_path: Path, dtype: str, cast: Callable) -> None:
    t = make_truth(4, {"syn_text": ["one", "two", "three"]})
    combined = arrays_of(t, "combined")
    members = encode_reinforcement(t["paug"], t["syn"]["syn_text"], t["image_emb"], combined["text_emb"], dtype)
    assert tuple(members) == REINFORCEMENT_KEYS
    assert members == encode_reinforcement(t["paug"], t["syn"]["syn_text"], t["image_emb"],
                                           combined["text_emb"], dtype), "not deterministic"
    assert b" " not in members["paug.json"] and json.loads(members["syn.json"]) == {"syn_text": t["syn"]["syn_text"]}
    with np.load(io.BytesIO(members["npz"])) as npz:
        assert npz["text_emb"].dtype == np.dtype(dtype) and npz["text_emb"].shape == (4, DIM)
    (raw,) = roundtrip(tmp_path, [{"__key__": "ours", "txt": b"gt", **members}])
    check(decode_reinforcement(raw), t, cast)


def test_encoder_without_synthetic_captions_roundtrips() -> None:
    t = make_truth(5, {"syn_text": []})
    r = decode_reinforcement({"__key__": "e", **encode_reinforcement(t["paug"], [], t["image_emb"], t["gt_emb"])})
    assert r.syn_texts == [] and r.syn_text_emb.shape == (0, DIM) and r.text_emb.shape == (1, DIM)


@pytest.mark.parametrize("change,field", [
    ({"param_aug": [[]]}, "param_aug"),
    ({"syn_texts": ["only one"]}, "text_emb"),
    ({"image_emb": np.zeros((N_AUG, DIM + 1), np.float32)}, "D="),
    ({"dtype": "int8"}, "dtype"),
])
def test_encoder_validates_shapes(change: dict[str, Any], field: str) -> None:
    t = make_truth(6)
    args = {"param_aug": t["paug"], "syn_texts": ["a", "b"], "image_emb": t["image_emb"],
            "text_emb": np.zeros((3, DIM), np.float32), **change}
    with pytest.raises(ReinforcementError, match=field):
        encode_reinforcement(**args)


# ------------------------------------------------------------------------------------------------ malformed samples
def _drop(*members: str) -> Callable[[dict], None]:
    return lambda raw: [raw.pop(m) for m in members]


def _arrays(layout: str, change: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        arrays = arrays_of(make_truth(9), layout)
        change(arrays)
        raw["npz"] = npz_bytes(arrays, np.float32)
    return mutate


ERRORS = {
    "no-paug": (_drop("paug.json"), "paug.json"),
    "no-syn": (_drop("syn.json"), "syn.json"),
    "no-embeddings": (_drop("npz"), "npz/pth.gz"),
    "no-image-emb": (_arrays("combined", lambda a: a.pop("image_emb")), "image_emb"),
    "no-text-emb": (_arrays("combined", lambda a: a.pop("text_emb")), "text_emb"),
    "no-syn-emb": (_arrays("separate", lambda a: a.pop("syn_text_2_emb")), "syn_text_2_emb"),
    "image-rows": (_arrays("combined", lambda a: a.update(image_emb=a["image_emb"][:-1])), "image_emb"),
    "text-rows": (_arrays("combined", lambda a: a.update(text_emb=a["text_emb"][:-1])), "text_emb"),
    "syn-emb-rows": (_arrays("separate", lambda a: a.update(syn_text_emb=a["syn_text_emb"][:1])), "syn_text_emb"),
    "dim": (_arrays("combined", lambda a: a.update(image_emb=a["image_emb"][:, :-1])), "image_emb"),
    "corrupt-npz": (lambda raw: raw.update(npz=raw["npz"][:40]), "npz"),
    "truncated-gzip": (lambda raw: (raw.pop("npz"), raw.update({"pth.gz": pth_gz_bytes(
        bf16_dict(arrays_of(make_truth(9), "combined")))[:-20]})), "pth.gz"),
    "paug-not-json": (lambda raw: raw.update({"paug.json": b"{nope"}), "paug.json"),
    "no-syn-keys": (lambda raw: raw.update({"syn.json": b'{"captions": ["x"]}'}), "syn.json"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_malformed_samples_raise_one_line_naming_key_and_field(case: str) -> None:
    mutate, field = ERRORS[case]
    t = make_truth(9)
    raw = {**base_sample("bad/0042", t), "npz": npz_bytes(arrays_of(t, "combined"), np.float32)}
    decode_reinforcement(dict(raw))  # the unmodified sample is fine
    mutate(raw)
    with pytest.raises(ReinforcementError) as err:
        decode_reinforcement(raw)
    message = str(err.value)
    assert "bad/0042" in message and field in message and "\n" not in message, message


def test_key_argument_names_samples_without_key() -> None:
    with pytest.raises(ReinforcementError, match="given-key.*paug.json"):
        decode_reinforcement({"syn.json": b"{}", "npz": b""}, key="given-key")
    assert not has_reinforcement({"paug.json": b"", "syn.json": b""})


EXECUTED: list[str] = []


def _side_effect(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return (_side_effect, ("unpickled",))


def test_pth_gz_with_arbitrary_python_objects_is_refused() -> None:
    t = make_truth(10)
    raw = {**base_sample("evil", t), "pth.gz": pth_gz_bytes({"image_emb": Payload(), "text_emb": torch.zeros(1)})}
    with pytest.raises(ReinforcementError, match="evil.*pth.gz"):
        decode_reinforcement(raw)
    assert EXECUTED == [], "weights_only=False would have run the pickled callable"
