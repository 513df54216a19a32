"""The `s3://` half of the storage layer (import `lightclip_core.infra.storage`, not this module).

Any S3-compatible endpoint: the endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, the credentials from
boto3's own chain (environment variables, web identity, instance role), never from parameters and never logged.
Requests are retried by botocore (`standard` mode: exponential backoff with jitter on throttling, 5xx and connection
errors; AWS_RETRY_MODE and AWS_MAX_ATTEMPTS, total attempts, are honoured), with bounded connect and read timeouts
(LIGHTCLIP_S3_CONNECT_TIMEOUT, LIGHTCLIP_S3_READ_TIMEOUT, seconds). Files above LIGHTCLIP_S3_MULTIPART_THRESHOLD
bytes (default 64 MiB) go up in parts of LIGHTCLIP_S3_MULTIPART_CHUNKSIZE; S3 shows such an object only after the
last part is committed, and boto3 aborts the upload if a part fails, so a reader never sees half a file.
Every failure becomes one `FileNotFoundError` / `PermissionError` / `OSError` line that names the URI.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

_MiB = 1 << 20
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE",
               "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "LIGHTCLIP_S3_CONNECT_TIMEOUT",
               "LIGHTCLIP_S3_READ_TIMEOUT")
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


@dataclass(frozen=True)
class ObjectStat:
    """Size and version tag of a stored object (`etag`: the S3 ETag; None for a local file)."""

    size: int
    etag: str | None


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); the key may be empty or end with `/` (a prefix)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: expected s3://bucket/key")
    return bucket, key


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client():
    """The S3 client for the current environment (one per process and environment; boto3 clients are thread-safe,
    and a forked DataLoader worker builds its own)."""
    return _client(os.getpid(), tuple(os.environ.get(name) for name in _CLIENT_ENV))


@functools.lru_cache(maxsize=8)
def _client(pid: int, env: tuple[str | None, ...]):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": os.environ.get("AWS_RETRY_MODE") or "standard"},  # AWS_MAX_ATTEMPTS: botocore
                    connect_timeout=float(os.environ.get("LIGHTCLIP_S3_CONNECT_TIMEOUT", 10)),
                    read_timeout=float(os.environ.get("LIGHTCLIP_S3_READ_TIMEOUT", 60)))
    return boto3.session.Session().client("s3", endpoint_url=endpoint(), config=config)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=int(os.environ.get("LIGHTCLIP_S3_MULTIPART_THRESHOLD", 64 * _MiB)),
        multipart_chunksize=int(os.environ.get("LIGHTCLIP_S3_MULTIPART_CHUNKSIZE", 16 * _MiB)),
        max_concurrency=int(os.environ.get("LIGHTCLIP_S3_MAX_CONCURRENCY", 4)))


def error(uri: str, err: BaseException) -> OSError:
    """One line naming `uri`: FileNotFoundError (no such object or bucket), PermissionError (refused credentials)
    or OSError (anything else: unreachable endpoint, retries exhausted). Credentials are never part of it."""
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        info = err.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _MISSING or status == 404:
            what = "no such bucket" if code == "NoSuchBucket" else "no such object"
            return FileNotFoundError(f"{uri}: {what}")
        detail = f"{code or status}: {info.get('Message') or 'no message'}"
        if code in _DENIED or status == 403:
            return PermissionError(_redact(f"{uri}: access denied ({detail})"))
        return OSError(_redact(f"{uri}: {detail}"))
    return OSError(_redact(f"{uri}: {type(err).__name__}: {err}"))


def _redact(text: str) -> str:
    """Defence in depth: no service message should carry a credential, but none may ever reach a log."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def call(uri: str, operation: str, **kwargs: Any) -> dict[str, Any]:
    try:
        return getattr(client(), operation)(**kwargs)
    except Exception as err:
        raise error(uri, err) from None


# ------------------------------------------------------------------------------------------------ operations
def stat(uri: str) -> ObjectStat | None:
    """Size and ETag of the object at `uri`, None if there is none."""
    bucket, key = split_s3(uri)
    try:
        head = call(uri, "head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return ObjectStat(head["ContentLength"], head["ETag"])


def exists(uri: str) -> bool:
    """An object at `uri`, or any object under the prefix `uri/`."""
    bucket, key = split_s3(uri)
    if key and not key.endswith("/") and stat(uri) is not None:
        return True
    prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""
    try:
        return bool(call(uri, "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0))
    except FileNotFoundError:
        return False


def read_bytes(uri: str) -> bytes:
    bucket, key = split_s3(uri)
    body = call(uri, "get_object", Bucket=bucket, Key=key)["Body"]
    try:
        return body.read()
    except Exception as err:
        raise error(uri, err) from None
    finally:
        body.close()


def write_bytes(uri: str, data: bytes) -> None:
    """One PUT: S3 stores the whole object or nothing."""
    bucket, key = split_s3(uri)
    call(uri, "put_object", Bucket=bucket, Key=key, Body=data)


def upload_file(local_path: str | os.PathLike, uri: str) -> None:
    bucket, key = split_s3(uri)
    try:
        client().upload_file(str(local_path), bucket, key, Config=transfer_config())
    except Exception as err:
        raise error(uri, _cause(err)) from None


def download_file(uri: str, local_path: str | os.PathLike) -> None:
    """Download into `local_path` as it is (the caller makes it atomic)."""
    bucket, key = split_s3(uri)
    try:
        client().download_file(bucket, key, str(local_path), Config=transfer_config())
    except Exception as err:
        raise error(uri, _cause(err)) from None


def _cause(err: BaseException) -> BaseException:
    """boto3's transfer manager wraps the botocore error of a failed upload in S3UploadFailedError."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        return err.__context__
    return err


def list_objects(prefix_uri: str) -> dict[str, dict[str, Any]]:
    """{name relative to the prefix: the listing entry (Size, ETag, ...)} for every object under `prefix_uri/`."""
    bucket, key = split_s3(prefix_uri)
    prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {obj["Key"][len(prefix):]: obj for page in pages for obj in page.get("Contents", [])
                if not obj["Key"].endswith("/")}
    except Exception as err:
        raise error(prefix_uri, err) from None


def delete(uri: str) -> None:
    """Delete one object; deleting an absent object is not an error (S3's own semantics)."""
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise IsADirectoryError(f"{uri}: delete removes one object, not a prefix")
    call(uri, "delete_object", Bucket=bucket, Key=key)
