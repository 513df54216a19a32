"""Per-sample reinforcement fields of DataCompDR-style shards (MobileCLIP dataset reinforcement).

Next to the image, `txt` (ground-truth caption) and `json`, a reinforced WebDataset sample holds:

* ``paug.json``: ``{"param_aug": [p_0, ..., p_{N-1}]}``, N opaque augmentation parameter sets. Also accepted:
  the value of ``param_aug`` as a JSON string, a bare top-level list, or the whole file as a JSON string of either.
* ``syn.json``: ``{"syn_text": [...], "syn_text_2": [...], ...}``; every key matching ``^syn_text.*$`` holds
  synthetic captions, taken in file order; other keys are ignored.
* ``npz`` (``np.savez`` of float32/float16 arrays) or ``pth.gz`` (gzip of ``torch.save`` of a dict of tensors,
  loaded with ``weights_only=True``); ``npz`` wins when both exist. ``image_emb`` is ``[N, D]``. ``text_emb`` is
  either combined, ``[1 + n_syn, D]`` (row 0 the ground truth, then the synthetic captions in key order), or
  separate, ``[1, D]`` with one ``<K>_emb`` array ``[len(syn[K]), D]`` per synthetic key ``K``.

Our writer produces ``paug.json``, ``syn.json`` and an uncompressed ``npz`` in the combined layout.
"""
from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from lightclip_core.data.skips import SampleError

REINFORCEMENT_KEYS = ("paug.json", "syn.json", "npz")
EMBEDDING_MEMBERS = ("npz", "pth.gz")
_SYN_KEY = re.compile(r"^syn_text.*$")
_N_GT = 1  # ground-truth caption rows in text_emb


class ReinforcementError(SampleError):
    """A reinforced sample is missing a field, has inconsistent shapes, or cannot be decoded (a `bad_reinforcement`
    skip where samples are read)."""

    def __init__(self, message: str):
        super().__init__("bad_reinforcement", message)


@dataclass
class Reinforcement:
    param_aug: list
    syn_texts: list[str]
    image_emb: np.ndarray  # float32 [N, D]
    text_emb: np.ndarray  # float32 [1, D], the ground-truth caption
    syn_text_emb: np.ndarray  # float32 [n_syn, D], aligned with syn_texts

    @property
    def num_augmentations(self) -> int:
        return len(self.param_aug)

    @property
    def num_synthetic(self) -> int:
        return len(self.syn_texts)

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])


def _fail(key: Any, field: str, detail: str) -> ReinforcementError:
    return ReinforcementError(" ".join(f"sample {key!r}: {field}: {detail}".split()))


# ------------------------------------------------------------------------------------------------ writer
def encode_reinforcement(param_aug: list, syn_texts: list[str], image_emb: np.ndarray, text_emb: np.ndarray,
                         dtype: str = "float16") -> dict[str, bytes]:
    """The `paug.json`, `syn.json` and `npz` members of one sample; `text_emb` is `[1 + len(syn_texts), D]`."""
    if dtype not in ("float16", "float32"):
        raise ReinforcementError(f"dtype must be float16 or float32, not {dtype!r}")
    image, text = np.asarray(image_emb), np.asarray(text_emb)
    if image.ndim != 2 or text.ndim != 2:
        raise ReinforcementError(f"image_emb {image.shape} and text_emb {text.shape} must both be 2-D")
    if image.shape[0] != len(param_aug):
        raise ReinforcementError(f"image_emb has {image.shape[0]} rows but param_aug has {len(param_aug)} entries")
    if text.shape[0] != _N_GT + len(syn_texts):
        raise ReinforcementError(f"text_emb has {text.shape[0]} rows, expected 1 + {len(syn_texts)} syn_texts")
    if image.shape[1] != text.shape[1]:
        raise ReinforcementError(f"image_emb D={image.shape[1]} differs from text_emb D={text.shape[1]}")
    buf = io.BytesIO()
    np.savez(buf, image_emb=image.astype(dtype), text_emb=text.astype(dtype))  # fixed zip timestamps: same bytes
    dumps = lambda obj: json.dumps(obj, separators=(",", ":")).encode("utf-8")  # noqa: E731
    return {"paug.json": dumps({"param_aug": list(param_aug)}),
            "syn.json": dumps({"syn_text": [str(t) for t in syn_texts]}), "npz": buf.getvalue()}


# ------------------------------------------------------------------------------------------------ reader
def has_reinforcement(raw: Mapping[str, Any]) -> bool:
    return "paug.json" in raw and "syn.json" in raw and any(m in raw for m in EMBEDDING_MEMBERS)


def _json(raw: Mapping[str, Any], member: str, key: Any) -> Any:
    if member not in raw:
        raise _fail(key, member, "missing")
    try:
        value = raw[member]
        value = json.loads(bytes(value).decode("utf-8") if not isinstance(value, str) else value)
        for _ in range(3):  # a JSON document that is itself a JSON string
            if not isinstance(value, str):
                break
            value = json.loads(value)
    except (ValueError, TypeError) as e:
        raise _fail(key, member, f"invalid JSON ({e})") from e
    return value


def _param_aug(raw: Mapping[str, Any], key: Any) -> list:
    value = _json(raw, "paug.json", key)
    if isinstance(value, dict):
        if "param_aug" not in value:
            raise _fail(key, "paug.json", "no 'param_aug' entry")
        value = value["param_aug"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise _fail(key, "paug.json", f"param_aug is not valid JSON ({e})") from e
    if not isinstance(value, list):
        raise _fail(key, "paug.json", f"param_aug must be a list, not {type(value).__name__}")
    return value


def _syn_texts(raw: Mapping[str, Any], key: Any) -> dict[str, list[str]]:
    value = _json(raw, "syn.json", key)
    if not isinstance(value, dict):
        raise _fail(key, "syn.json", f"must be an object, not {type(value).__name__}")
    groups = {k: v for k, v in value.items() if _SYN_KEY.match(k)}
    if not groups:
        raise _fail(key, "syn.json", "no syn_text* entry")
    for k, v in groups.items():
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise _fail(key, f"syn.json[{k!r}]", "must be a list of strings")
    return groups


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files}


def _load_pth_gz(data: bytes) -> dict[str, np.ndarray]:
    import torch

    obj = torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict of tensors, got {type(obj).__name__}")
    return {str(k): v.detach().float().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _embeddings(raw: Mapping[str, Any], key: Any) -> dict[str, np.ndarray]:
    member = next((m for m in EMBEDDING_MEMBERS if m in raw), None)
    if member is None:
        raise _fail(key, "npz/pth.gz", "missing embeddings")
    data = raw[member]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(key, member, f"expected bytes, got {type(data).__name__}")
    try:
        return (_load_npz if member == "npz" else _load_pth_gz)(bytes(data))
    except Exception as e:  # corrupt zip/gzip/pickle, or a non-tensor object refused by weights_only
        raise _fail(key, member, f"cannot decode ({type(e).__name__}: {str(e)[:300]})") from e


def _array(arrays: Mapping[str, np.ndarray], name: str, key: Any) -> np.ndarray:
    if name not in arrays:
        raise _fail(key, name, f"missing (arrays: {sorted(arrays)})")
    arr = np.atleast_2d(arrays[name])
    if arr.ndim != 2:
        raise _fail(key, name, f"must be 2-D, got shape {arr.shape}")
    return arr


def decode_reinforcement(raw: Mapping[str, Any], key: str | None = None) -> Reinforcement:
    """The reinforcement of a raw WebDataset sample; raises ReinforcementError naming the sample and field."""
    key = raw.get("__key__") or key
    param_aug, groups = _param_aug(raw, key), _syn_texts(raw, key)
    arrays = _embeddings(raw, key)
    image, text = _array(arrays, "image_emb", key), _array(arrays, "text_emb", key)
    syn_texts = [t for texts in groups.values() for t in texts]
    if image.shape[0] != len(param_aug):
        raise _fail(key, "image_emb", f"{image.shape[0]} rows but paug.json has {len(param_aug)} entries")
    if text.shape[0] > _N_GT:  # combined layout
        if text.shape[0] != _N_GT + len(syn_texts):
            raise _fail(key, "text_emb", f"{text.shape[0]} rows, expected 1 + {len(syn_texts)} syn_texts")
        syn = text[_N_GT:]
    elif text.shape[0] == _N_GT:  # separate layout; a key without captions needs no array
        parts = []
        for k, texts in groups.items():
            if not texts and f"{k}_emb" not in arrays:
                continue
            part = _array(arrays, f"{k}_emb", key)
            if part.shape[0] != len(texts) or part.shape[1] != text.shape[1]:
                raise _fail(key, f"{k}_emb", f"shape {part.shape}, expected ({len(texts)}, {text.shape[1]})")
            parts.append(part)
        syn = np.concatenate(parts) if parts else np.zeros((0, text.shape[1]), np.float32)
    else:
        raise _fail(key, "text_emb", "has no rows")
    if image.shape[1] != text.shape[1]:
        raise _fail(key, "image_emb", f"D={image.shape[1]} differs from text_emb D={text.shape[1]}")
    return Reinforcement(param_aug, syn_texts, image, np.ascontiguousarray(text[:_N_GT]), np.ascontiguousarray(syn))
