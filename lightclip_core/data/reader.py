"""Reading WebDataset tar shards without ever stopping on bad data (DESIGN.md section 3; skips.py for the counts).

A missing, cut, garbled or non-tar shard gives the samples before the damage; a sample without its image or caption
member is dropped; a shard whose sha256 differs from its manifest (checked once per process) has each of its samples
decoded, so only the bad ones are dropped. What is dropped is counted per reason in a `SkipTally`; the decoders raise
`SampleError` for a sample they cannot use, which `decoded` and `ShardStream` skip and count the same way.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from lightclip_core.data.reinforced import EMBEDDING_MEMBERS, decode_reinforcement
from lightclip_core.data.skips import SampleError, SkipTally
from lightclip_core.infra.storage import sha256_file


@dataclass(frozen=True)
class ShardRef:
    """A shard as its manifest lists it: its path, and (when known) its sample count and sha256. Path-like."""

    path: str
    num_samples: int | None = None
    sha256: str | None = None

    def __fspath__(self) -> str:
        return self.path


class ChecksumVerdicts:
    """Whether a shard file still has its manifest's sha256, hashed once per process for a file of the same path,
    size and modification time. A DataLoader worker is a process of its own: the workers of each epoch (they are
    not persistent) hash the shards they read again, which costs little next to decoding their images."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, int, int, str], bool] = {}

    def matches(self, path: str, expected: str) -> bool:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, expected)
        if key not in self._verdicts:
            self._verdicts[key] = sha256_file(path) == expected
        return self._verdicts[key]

    def clear(self) -> None:
        self._verdicts.clear()


CHECKSUMS = ChecksumVerdicts()  # this process's verdicts, shared by every reader in it

# ------------------------------------------------------------------------------------------------ reading tars
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REQUIRED_MEMBERS = ("image", "caption")  # what a training, reinforcement or evaluation sample cannot do without
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as webdataset skips them
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split at the first dot


class _Damage(Exception):
    """The tar cannot be read from here on; `member` names the member whose data is cut, when its header was read."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def _tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar in order; raises _Damage where the tar is cut, garbled or not a
    tar. An intact tar ends with a zero block after its last member: a tar cut exactly at a member boundary lacks it
    (tarfile alone would end there silently, as it does at a garbage header)."""
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise _Damage(f"not a readable tar ({err})") from None
        with tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, EOFError, OSError) as err:
                    raise _Damage(f"unreadable from byte {tar.offset} on ({err})") from None
                if info is None:
                    break
                tar.members = []  # a streaming read: keep no member list
                if not info.isreg():
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError) as err:
                    raise _Damage(f"member {info.name!r} is cut ({err})", info.name) from None
                if len(data) != info.size:
                    raise _Damage(f"member {info.name!r} is cut ({len(data)} of {info.size} bytes)", info.name)
                yield info.name, data
            end = tar.offset
        f.seek(end)
        tail = f.read(tarfile.BLOCKSIZE)
        if not tail or tail.strip(b"\0"):
            raise _Damage(f"unreadable from byte {end} on: {'it ends' if not tail else 'no tar header'} where the "
                          "next member or the end-of-archive block should be")


def _key_and_ext(name: str) -> tuple[str | None, str]:
    """webdataset's sample key and (lower-case) extension of a member name; (None, "") for a member it skips."""
    if _META_NAME.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None, ""
    match = _NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


def _finish(sample: dict[str, Any], tally: SkipTally, require: tuple[str, ...], validate: bool
            ) -> Iterator[dict[str, Any]]:
    """The sample if it is usable (and, for a shard whose checksum failed, decodes completely); else counted."""
    tally.seen += 1
    where = f"sample {sample['__key__']!r} of {sample['__url__']}"
    if sample.pop("__duplicate__", False):
        tally.skip("duplicate_member", detail=f"{where}: two members with the same extension")
        return
    if "image" in require and not any(ext in sample for ext in IMAGE_EXTS):
        tally.skip("missing_image", detail=f"{where}: no image member (members: {sorted(sample)})")
        return
    if "caption" in require and "txt" not in sample:
        tally.skip("missing_caption", detail=f"{where}: no txt member (members: {sorted(sample)})")
        return
    if validate:
        try:
            validate_sample(sample)
        except SampleError as err:
            tally.skip(err.reason, detail=f"{where}: {err}")
            return
    yield sample


def _read_shard(ref: ShardRef, tally: SkipTally, require: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The usable samples of one shard, in order; everything else is counted in `tally`, nothing raises."""
    expected = ref.num_samples
    if not os.path.isfile(ref.path):
        lost = expected if expected is not None else 1
        tally.shard_event("missing", ref.path)
        tally.seen += lost
        tally.skip("missing_shard", lost, detail=f"{ref.path}: no such shard ({lost} samples)")
        return
    validate = bool(ref.sha256) and not CHECKSUMS.matches(ref.path, ref.sha256)
    if validate:
        tally.shard_event("checksum_mismatch", f"{ref.path}: sha256 differs from the manifest; validating every "
                                               "sample")
    done = 0  # samples finished (yielded or skipped) before the one in progress
    current: dict[str, Any] | None = None
    try:
        for name, data in _tar_members(ref.path):
            key, ext = _key_and_ext(name)
            if key is None:
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    done += 1
                    yield from _finish(current, tally, require, validate)
                current = {"__key__": key, "__url__": ref.path}
            if ext in current:
                current["__duplicate__"] = True
            else:
                current[ext] = data
    except _Damage as err:
        # the sample in progress is kept only if the member that is cut belongs to the next one; else it may lack
        # members that were cut off, and it is never kept
        if current is not None and err.member is not None and _key_and_ext(err.member)[0] != current["__key__"]:
            done += 1
            yield from _finish(current, tally, require, validate)
        lost = max(1, expected - done) if expected is not None else 1
        tally.shard_event("truncated", f"{ref.path}: {err}")
        tally.seen += lost
        tally.skip("truncated_shard", lost, detail=f"{ref.path}: {err}; {lost} sample(s) lost")
        return
    if current is not None:
        done += 1
        yield from _finish(current, tally, require, validate)
    if expected is not None and done < expected:
        tally.seen += expected - done
        tally.skip("truncated_shard", expected - done,
                   detail=f"{ref.path}: {done} samples, its manifest lists {expected}")


def iter_raw_samples(shards: Iterable[str | ShardRef], tally: SkipTally | None = None,
                     require: tuple[str, ...] = REQUIRED_MEMBERS) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples (bytes per extension, `__key__`, `__url__`) of tar files, in order.

    Never raises on bad data: a missing, cut, garbled or non-tar shard yields the samples before the damage, a
    sample without a `require`d member ("image", "caption") is dropped, and a shard whose sha256 differs from its
    `ShardRef` has every sample validated (see validate_sample); each is counted in `tally` (skips.py)."""
    tally = tally if tally is not None else SkipTally()
    for shard in shards:
        ref = shard if isinstance(shard, ShardRef) else ShardRef(str(shard))
        yield from _read_shard(ref, tally, tuple(require))


def decoded(raws: Iterable[dict[str, Any]], decode: Callable[[dict[str, Any]], Any], tally: SkipTally
            ) -> Iterator[Any]:
    """`decode(raw)` of each raw sample; a sample it refuses (SampleError) is skipped and counted."""
    for raw in raws:
        try:
            yield decode(raw)
        except SampleError as err:
            tally.skip(err.reason, detail=f"sample {raw.get('__key__')!r} of {raw.get('__url__')}: {err}")


def open_image(data: bytes, what: str):
    """Encoded image bytes as a PIL image, fully decoded and converted to RGB; a SampleError (`undecodable_image`,
    naming `what`) when they do not decode completely."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as err:  # PIL reports corrupt data with many types (OSError, SyntaxError, ValueError)
        raise SampleError("undecodable_image", f"{what}: {type(err).__name__}: {err}") from None


def decode_image(raw: dict[str, Any]):
    """The PIL image of a raw sample (`jpg`, `jpeg`, `png` or `webp`), fully decoded and converted to RGB; a
    SampleError (`missing_image`, `undecodable_image`) when there is none or it does not decode completely."""
    for ext in IMAGE_EXTS:
        if ext in raw:
            return open_image(raw[ext], ext)
    raise SampleError("missing_image", f"no image member (keys: {sorted(raw)})")


def decode_caption(raw: dict[str, Any]) -> str:
    """The caption (`txt`) of a raw sample as text; a SampleError when it is missing or not UTF-8."""
    if "txt" not in raw:
        raise SampleError("missing_caption", f"no txt member (keys: {sorted(raw)})")
    try:
        return raw["txt"].decode("utf-8") if isinstance(raw["txt"], bytes) else raw["txt"]
    except UnicodeDecodeError as err:
        raise SampleError("undecodable_caption", f"txt is not UTF-8 ({err})") from None


def decode_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The `json` metadata ({} without one); a SampleError (`bad_metadata`) when it is not a JSON object."""
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError("bad_metadata", f"json does not parse ({err})") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_metadata", f"json is a {type(meta).__name__}, not an object")
    return meta


def validate_sample(raw: dict[str, Any]) -> None:
    """Decode every member a reader will use that is there (image, caption, metadata, reinforcement fields; which
    must be there is `require`'s business); a SampleError names the first that fails. Used for the samples of a
    shard whose checksum does not match its manifest."""
    if any(ext in raw for ext in IMAGE_EXTS):
        decode_image(raw)
    if "txt" in raw:
        decode_caption(raw)
    decode_meta(raw)
    if any(member in raw for member in ("paug.json", "syn.json", *EMBEDDING_MEMBERS)):
        decode_reinforcement(raw)
