"""One storage layer for local paths and `s3://bucket/key` URIs (DESIGN.md section 3): a reader never sees a file
half-done.

Locally a file is written under a temporary name next to its final name and renamed. On S3 one PUT, or a multipart
upload, is atomic by itself: the object appears only when complete. A directory (a split, a checkpoint) is published
with `publish_dir`, which writes its manifest last, so a reader that starts from the manifest never finds a file it
names missing. The S3 details (client, retries, timeouts, multipart, errors) live in `lightclip_core.infra.s3`.
S3 URIs are plain strings: `Path("s3://b/k")` collapses the `//`, so never wrap one in a Path.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from lightclip_core.infra import s3
from lightclip_core.infra.s3 import ObjectStat, is_s3, split_s3

__all__ = ["ObjectStat", "atomic_path", "delete", "download_file", "exists", "fetch_to_local", "is_s3", "join",
           "list_files", "publish_dir", "read_bytes", "read_json", "read_versioned_json", "redact_uri", "s3_client",
           "sha256_file", "split_s3", "stat", "sweep_stale_tmp", "upload_file", "write_bytes_atomic",
           "write_json_atomic"]

log = logging.getLogger(__name__)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()
_TMP_SUFFIX = ".tmp"
# `.<final name>.<8 random characters of mkstemp>.tmp`: what `atomic_path` creates, and all that the sweep removes
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` only if the block succeeds.

    While the block runs the temporary file is locked (flock); the kernel drops the lock when the writer dies, which
    is how :func:`sweep_stale_tmp` tells a file a killed writer left behind from one still being written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=final.parent)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: the sweep leaves such files alone
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; published files get the usual mode
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


def sweep_stale_tmp(out: str | os.PathLike) -> list[Path]:
    """Remove, under the output directory `out`, the temporary files of :func:`atomic_path` whose writer is gone
    (killed mid-write), so that they never reach DVC's hash of the output; returns what was removed.

    Only names of that scheme (`.<name>.<8 characters>.tmp`) are considered, and of those only files nobody holds
    the writer's lock on: a writer still at work (another rank, another worker of a fan-out) keeps its file. Call it
    at the start of a stage, on the stage's own output. An `s3://` output has no temporary objects (an upload appears
    whole or not at all), and a file system without locks keeps its files: nothing tells whose they are."""
    if is_s3(out) or not Path(out).is_dir():
        return []
    removed = [path for folder, _, names in os.walk(out) for name in names
               if _TMP_NAME.match(name) and _remove_if_abandoned(path := Path(folder, name))]
    if removed:
        log.info("removed %d temporary file(s) that interrupted writes left under %s", len(removed), out)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile, a link, or not ours to read
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
        mine, now = os.fstat(fd), os.stat(path)
        if (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino):  # renamed or replaced meanwhile
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def redact_uri(text: str) -> str:
    """`text`, a URI or a message containing URIs, with its credentials masked: `user:password@` (or `token@`)
    becomes `***@` and the values of query parameters that carry secrets (`token`, `sig`, `X-Amz-Signature`,
    `X-Amz-Credential`, `X-Amz-Security-Token`, `password`, `api_key`, ...) become `***`. Credentials belong in
    the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, AWS_*); a URI that carries some is shown this way in
    every log line, MLflow parameter, message and summary."""
    return _URI_IN_TEXT.sub(_redact_one, str(text))


_URI_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_QUERY_PAIR = re.compile(r"([?&;])([^=&;#]+)=([^&;#]*)")
_SECRET_NAME = re.compile(r"token|sig|secret|passw|pwd|credential|api[-_]?key|access[-_]?key|^key$|auth", re.I)


def _redact_one(match: re.Match) -> str:
    uri = _USERINFO.sub(r"\1***@", match.group(0))
    return _QUERY_PAIR.sub(lambda m: f"{m[1]}{m[2]}=***" if _SECRET_NAME.search(m[2]) else m[0], uri)


# ------------------------------------------------------------------------------------------------ one file
def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local directory or an S3 prefix."""
    if not is_s3(base):
        return str(Path(base, *parts))
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([str(base).rstrip("/"), *pieces]) if pieces else str(base)


def exists(uri: str | os.PathLike) -> bool:
    """A file or directory; on S3 an object or a non-empty prefix."""
    return s3.exists(str(uri)) if is_s3(uri) else Path(uri).exists()


def stat(uri: str | os.PathLike) -> ObjectStat | None:
    """Size and version tag (S3 ETag; None locally) of a file or object, None if there is none."""
    if is_s3(uri):
        return s3.stat(str(uri))
    path = Path(uri)
    return ObjectStat(path.stat().st_size, None) if path.is_file() else None


def read_bytes(uri: str | os.PathLike) -> bytes:
    if is_s3(uri):
        return s3.read_bytes(str(uri))
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    if is_s3(final):
        s3.write_bytes(str(final), data)
        return
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def upload_file(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file to `uri`; the destination shows the whole file or nothing (multipart above a threshold
    on S3, see `lightclip_core.infra.s3`)."""
    if not Path(local_path).is_file():
        raise FileNotFoundError(f"{local_path}: no such file")
    if is_s3(uri):
        s3.upload_file(local_path, str(uri))
        return
    with atomic_path(uri) as tmp:
        shutil.copyfile(local_path, tmp)


def download_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    """Copy `uri` to a local file, atomically: `local_path` holds the old content or the whole new one."""
    if not is_s3(uri) and not Path(uri).is_file():
        raise FileNotFoundError(f"{uri}: no such file")
    with atomic_path(local_path) as tmp:
        if is_s3(uri):
            s3.download_file(str(uri), tmp)
        else:
            shutil.copyfile(uri, tmp)


def delete(uri: str | os.PathLike) -> None:
    """Delete one file or object; an absent one is not an error (as on S3)."""
    if is_s3(uri):
        s3.delete(str(uri))
        return
    with contextlib.suppress(FileNotFoundError):
        Path(uri).unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_versioned_json(path: str | os.PathLike, version_key: str, expected: int, missing_hint: str) -> dict[str, Any]:
    """Read a JSON contract file (a manifest, an export config) and check its format version."""
    found = s3.stat(str(path)) is not None if is_s3(path) else Path(path).is_file()
    if not found:
        parent, _, name = str(path).rpartition("/") if is_s3(path) else (Path(path).parent, "", Path(path).name)
        raise FileNotFoundError(f"no {name} in {parent}: {missing_hint}")
    content = read_json(path)
    if content.get(version_key) != expected:
        raise ValueError(f"{path}: {version_key} {content.get(version_key)!r}, expected {expected}")
    return content


# ------------------------------------------------------------------------------------------------ directories
def list_files(prefix_uri: str | os.PathLike) -> list[str]:
    """Names (relative, `/`-separated, sorted) of every file under a directory or S3 prefix, recursively; an absent
    directory or empty prefix gives []."""
    if is_s3(prefix_uri):
        return sorted(s3.list_objects(str(prefix_uri)))
    root = Path(prefix_uri)
    if root.is_file():
        raise NotADirectoryError(f"{prefix_uri}: a file, not a directory")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def publish_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, last: Iterable[str] = ("manifest.json",)
                ) -> list[str]:
    """Copy every file of `local_dir` to the directory or prefix `uri`, each one atomically, the files named in
    `last` (matched by file name, at any depth, in that order) after all others: a reader that trusts the manifest
    never sees it name a file that is not there yet. Temporary files of `atomic_path` are not published.
    Returns the published names in publication order."""
    last = list(last)
    names = [n for n in list_files(local_dir) if not _is_temporary(n)]
    if not names and not Path(local_dir).is_dir():
        raise FileNotFoundError(f"{local_dir}: no such directory")
    rank = {name: i for i, name in enumerate(last)}
    order = sorted(names, key=lambda n: (rank.get(n.rpartition("/")[2], -1), n))
    if not is_s3(uri) and Path(uri).resolve() == Path(local_dir).resolve():
        return order
    for name in order:
        upload_file(Path(local_dir, name), join(uri, name))
    return order


def _is_temporary(name: str) -> bool:
    base = name.rpartition("/")[2]
    return base.startswith(".") and base.endswith(_TMP_SUFFIX)


# ------------------------------------------------------------------------------------------------ s3:// inputs
_ETAG_SUFFIX = ".etag"


def s3_client():
    """The boto3 S3 client of the current environment (endpoint, credentials, retries: `lightclip_core.infra.s3`)."""
    return s3.client()


def default_cache_dir() -> Path:
    """Where objects fetched from storage are kept: `$LIGHTCLIP_CACHE`, else `<tmp>/lightclip-cache`. Every task of
    a node (and every pod of a pipeline) resolves it the same way, so they find each other's downloads."""
    return Path(os.environ.get("LIGHTCLIP_CACHE") or Path(tempfile.gettempdir()) / "lightclip-cache")


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
    if key == "" or key.endswith("/"):
        return _fetch_prefix(uri, key, root)
    found = s3.stat(uri)
    if found is None:
        raise FileNotFoundError(f"{uri}: no such object")
    return _fetch_object(uri, _inside(root, key), found)


def _inside(root: Path, key: str) -> Path:
    """`root/key`, refusing keys that would escape `root` (`..`, absolute parts)."""
    target = (root / key).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"object key {key!r} points outside the cache directory")
    return target


def _etag_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_ETAG_SUFFIX}")


def _fetch_object(uri: str, target: Path, found: ObjectStat) -> Path:
    """Download one object unless `target` already holds it (same size, same recorded ETag)."""
    sidecar = _etag_path(target)
    if (target.is_file() and target.stat().st_size == found.size and sidecar.is_file()
            and sidecar.read_text() == found.etag):
        return target
    download_file(uri, target)
    write_bytes_atomic(sidecar, found.etag.encode())
    return target


def _fetch_prefix(uri: str, prefix: str, root: Path) -> Path:
    """Download every object under `prefix`; local files no longer listed are removed (several tasks may share the
    cache: downloads in flight are left alone)."""
    target_dir = _inside(root, prefix) if prefix else root.resolve()
    objects = s3.list_objects(uri)
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    wanted: set[Path] = set()
    for name, obj in objects.items():
        path = _inside(root, obj["Key"])
        wanted.update({path, _etag_path(path)})
        _fetch_object(join(uri, name), path, ObjectStat(obj["Size"], obj["ETag"]))
    for stale in [p for p in target_dir.rglob("*") if p.is_file() and p not in wanted and not _in_flight(p)]:
        stale.unlink(missing_ok=True)
    return target_dir


def _in_flight(path: Path) -> bool:
    """A temporary file of a download still running (this or another task sharing the cache): never stale."""
    return path.name.startswith(".") and ".tmp" in path.name
