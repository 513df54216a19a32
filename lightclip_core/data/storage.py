"""File publication that a reader never sees half-done: write to a temporary name, then rename.

URLs are local paths today; `s3://` support lands behind these same functions (DESIGN.md section 3).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; published files get the usual mode
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_versioned_json(path: str | os.PathLike, version_key: str, expected: int, missing_hint: str) -> dict[str, Any]:
    """Read a JSON contract file (a manifest, an export config) and check its format version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}: {missing_hint}")
    content = json.loads(path.read_text())
    if content.get(version_key) != expected:
        raise ValueError(f"{path}: {version_key} {content.get(version_key)!r}, expected {expected}")
    return content


# ------------------------------------------------------------------------------------------------ s3:// inputs
_ETAG_SUFFIX = ".etag"


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); the key may be empty or end with `/` (a prefix)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: expected s3://bucket/key")
    return bucket, key


def s3_client():
    """A boto3 S3 client. The endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, Ceph, moto) and
    the credentials from boto3's own chain (environment variables, web identity, instance role): never from
    parameters, and never logged."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint)


def fetch_to_local(uri: str, cache_dir: str | os.PathLike) -> Path:
    """A local path holding `uri`'s content. Local paths are returned as they are; `s3://bucket/key` is downloaded
    to `cache_dir/bucket/key` (atomically) and reused while its size and ETag match; `s3://bucket/prefix/` downloads
    every object under the prefix into `cache_dir/bucket/prefix/` and returns that directory."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"{uri}: no such file or directory")
        return path
    bucket, key = split_s3(uri)
    root = Path(cache_dir) / bucket
    client = s3_client()
    if key == "" or key.endswith("/"):
        return _fetch_prefix(client, uri, bucket, key, root)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as err:
        raise _not_found(uri, err) from err
    return _fetch_object(client, bucket, key, _inside(root, key), head["ContentLength"], head["ETag"])


def _inside(root: Path, key: str) -> Path:
    """`root/key`, refusing keys that would escape `root` (`..`, absolute parts)."""
    target = (root / key).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"object key {key!r} points outside the cache directory")
    return target


def _not_found(uri: str, err: Exception) -> Exception:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
        return FileNotFoundError(f"{uri}: no such object")
    return OSError(f"{uri}: {type(err).__name__}: {err}")


def _etag_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_ETAG_SUFFIX}")


def _fetch_object(client, bucket: str, key: str, target: Path, size: int, etag: str) -> Path:
    """Download one object unless `target` already holds it (same size, same recorded ETag)."""
    sidecar = _etag_path(target)
    if (target.is_file() and target.stat().st_size == size and sidecar.is_file()
            and sidecar.read_text() == etag):
        return target
    with atomic_path(target) as tmp:
        client.download_file(bucket, key, str(tmp))
    write_bytes_atomic(sidecar, etag.encode())
    return target


def _fetch_prefix(client, uri: str, bucket: str, prefix: str, root: Path) -> Path:
    """Download every object under `prefix`; local files no longer listed are removed."""
    target_dir = _inside(root, prefix) if prefix else root.resolve()
    wanted: set[Path] = set()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    except Exception as err:
        raise _not_found(uri, err) from err
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    for obj in objects:
        path = _inside(root, obj["Key"])
        wanted.update({path, _etag_path(path)})
        _fetch_object(client, bucket, obj["Key"], path, obj["Size"], obj["ETag"])
    for stale in [p for p in target_dir.rglob("*") if p.is_file() and p not in wanted]:
        stale.unlink()
    return target_dir
