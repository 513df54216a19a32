"""Where the stages' inputs and outputs live: the one place that turns an `s3://` input into a local directory or
file and publishes a local output to an `s3://` prefix. A bad input raises :class:`InputError` (a ConfigError, so
every door stops with one line and exit code 2) naming the input as the command line spells it (`--data=...`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from lightclip_core.infra import storage
from lightclip_core.infra.schema import ConfigError

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class InputError(ConfigError):
    """An input or output location is missing or of the wrong kind."""


def flag(name: str) -> str:
    """How the command line spells the keyword argument `name` (`train_data` -> `--train-data`)."""
    return "--" + name.replace("_", "-")


def existing(path: str | os.PathLike, what: str, name: str) -> Path:
    """A local path that must exist."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag(name)}={str(path)!r}: {what} does not exist")
    return p


def complete_dir(uri: str | os.PathLike, what: str, name: str, marker: str = MANIFEST) -> None:
    """Check, downloading nothing, that `uri` (a local directory or an `s3://` prefix) holds its `marker` file,
    published last, which says it is complete."""
    uri = str(uri)
    if not storage.is_s3(uri) and not existing(uri, what, name).is_dir():
        raise InputError(f"{flag(name)}={uri!r}: {what} is not a directory")
    if not storage.exists(storage.join(uri, marker)):
        raise InputError(f"{flag(name)}={uri!r}: {what} has no {marker}")


def local_dir(uri: str | os.PathLike, what: str, name: str, marker: str = MANIFEST) -> Path:
    """A directory given as a local path or an `s3://` prefix (downloaded to the cache, reused by ETag) whose
    `marker` file, published last, says it is complete."""
    complete_dir(uri, what, name, marker)
    return localise(uri) if storage.is_s3(str(uri)) else Path(uri)


def split_of(uri: str | os.PathLike, split: str) -> str:
    """The split a `--data` path names: `uri` itself when it holds a manifest, its `<split>` folder when `uri` is a
    prepared root (train/, val/, test/ without a manifest of their own above them), else `uri` unchanged (the checks
    that follow say what is missing). Local paths and `s3://` prefixes alike; nothing is downloaded."""
    uri = str(uri)
    if storage.exists(storage.join(uri, MANIFEST)):
        return uri
    inner = storage.join(uri, split)
    if storage.exists(storage.join(inner, MANIFEST)):
        log.info("%s is a prepared root: reading its %s split %s", uri, split, inner)
        return inner
    return uri


def split_manifest(directory: str | os.PathLike, what: str, name: str, uri: str | os.PathLike | None = None
                   ) -> dict[str, Any]:
    """The manifest of the split in the local `directory` (given on the command line as `uri`), read before any
    work: one that is not JSON, of another format version, or without its sample and shard counts is an
    InputError (the path does not name a split this version made)."""
    from lightclip_core.data.shards import read_manifest

    where = f"{flag(name)}={str(uri if uri is not None else directory)!r}"
    try:
        manifest = read_manifest(directory)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{where}: the {what}'s {MANIFEST} is not JSON ({err})") from None
    except ValueError as err:  # read_versioned_json's format version; its subclasses (DataError) pass
        if type(err) is not ValueError:
            raise
        raise InputError(f"{where}: {err}") from None
    if not (isinstance(manifest.get("num_samples"), int) and isinstance(manifest.get("shards"), list)):
        raise InputError(f"{where}: the {what}'s {MANIFEST} has no num_samples or shards list")
    return manifest


def output_location(out: str | os.PathLike, what: str, name: str = "out") -> None:
    """Check, creating nothing, that a stage can write its local output `out`: an existing directory, or a new path
    whose nearest existing parent is a directory. An `s3://` prefix is checked when it is published."""
    out = str(out)
    if storage.is_s3(out):
        return
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag(name)}={out!r}: a file is there; the {what} is a directory")
        return
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise InputError(f"{flag(name)}={out!r}: {str(parent)!r} is a file, so the {what} cannot be created there")


def localise(uri: str | os.PathLike) -> Path:
    """A local directory holding the objects under `uri` (the directory itself for a local path); the same local
    path for the same URI in every stage of a job (the fetch cache)."""
    uri = str(uri)
    return storage.fetch_to_local(uri.rstrip("/") + "/" if storage.is_s3(uri) else uri, storage.default_cache_dir())


def local_file(uri: str | os.PathLike, what: str, name: str) -> Path:
    """A file given as a local path or an `s3://` object (downloaded to the cache)."""
    uri = str(uri)
    if not storage.is_s3(uri):
        if existing(uri, what, name).is_dir():
            raise InputError(f"{flag(name)}={uri!r}: {what} is a directory; expected a file")
        return Path(uri)
    if not storage.exists(uri):
        raise InputError(f"{flag(name)}={uri!r}: {what} does not exist")
    return storage.fetch_to_local(uri, storage.default_cache_dir())


def workdir(name: str) -> Path:
    """A fresh local directory for one stage's work (`$LIGHTCLIP_WORKDIR`, else the temporary directory)."""
    root = Path(os.environ.get("LIGHTCLIP_WORKDIR") or tempfile.gettempdir()) / "lightclip-work"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, name: str, last: Iterable[str] = (MANIFEST,)) -> Iterator[Path]:
    """The local directory a stage writes `out` in: `out` itself when local; for an `s3://` prefix a fresh work
    directory, published to `out` (the files `last` last) when the block ends without error, then removed."""
    if not storage.is_s3(str(out)):
        yield Path(out)
        return
    work = workdir(name)
    try:
        yield work
        storage.publish_dir(work, str(out), last=tuple(last))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict under slash-joined keys."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
