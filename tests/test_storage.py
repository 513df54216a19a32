"""The storage layer: every function behaves the same on local paths and on `s3://` URIs of a real S3 API server
(moto on 127.0.0.1); large files go up in parts and appear only when complete; failed requests are retried with
backoff; a published directory shows its manifest last; failures are one line naming the URI, never a credential.

Faults are injected by a small HTTP proxy between boto3 and the server that answers chosen requests with a 5xx,
as a throttling or failing S3 endpoint would.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest
import requests

from lightclip_core.infra import storage

KEY_ID, SECRET = "AKIALIGHTCLIPKEY0001", "lightclip-secret-do-not-log-0001"
_MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ fixtures
def _empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def bucket(s3_env, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    client = boto3.client("s3", endpoint_url=s3_env)
    name = f"storage-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    _empty_bucket(client, name)


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """A directory: a local path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('bucket')}/store"


class FaultyProxy:
    """Forwards HTTP requests to the S3 server, except those a rule answers with an error status; records every
    request as (method, path, query)."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rules: list[Callable[[str, str, str], int | None]] = []
        self.seen: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path, _, query = self.path.partition("?")
                proxy.seen.append((self.command, path, query))
                status = next((s for rule in proxy.rules if (s := rule(self.command, path, query))), None)
                if status:
                    reply = (f"<Error><Code>{'SlowDown' if status == 503 else 'InternalError'}</Code>"
                             f"<Message>injected</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(reply)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(bucket, s3_server, monkeypatch):
    """boto3 talks to the S3 server through a FaultyProxy (same bucket, same objects)."""
    faulty = FaultyProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty.url)
    yield faulty
    faulty.close()


def fail_first(times: int, status: int, method: str, path_end: str, query_has: str = ""):
    """A rule that answers the first `times` matching requests with `status`."""
    left = [times]

    def rule(m: str, path: str, query: str) -> int | None:
        if m == method and path.endswith(path_end) and query_has in query and left[0] > 0:
            left[0] -= 1
            return status
        return None

    return rule


def one_line_naming(err: BaseException, uri: str) -> bool:
    text = str(err)
    return uri in text and "\n" not in text and KEY_ID not in text and SECRET not in text


# ------------------------------------------------------------------------------------------------ every function
def test_join_makes_local_paths_and_s3_keys():
    assert storage.join("s3://b/p/", "a", "/b.json") == "s3://b/p/a/b.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("s3://b/p") == "s3://b/p"
    assert storage.join("/tmp/x", "a", "b.json") == str(Path("/tmp/x", "a", "b.json"))


def test_bytes_and_json_round_trip_exist_and_delete(base):
    uri = storage.join(base, "dir", "blob.bin")
    assert not storage.exists(uri) and storage.stat(uri) is None
    storage.write_bytes_atomic(uri, b"first")
    storage.write_bytes_atomic(uri, b"second!")  # replaces as a whole
    assert storage.read_bytes(uri) == b"second!"
    assert storage.exists(uri) and storage.exists(storage.join(base, "dir")) and storage.stat(uri).size == 7
    assert (storage.stat(uri).etag is None) != storage.is_s3(uri)
    storage.write_json_atomic(storage.join(base, "m.json"), {"b": [1, 2], "a": "x"})
    assert storage.read_json(storage.join(base, "m.json")) == {"a": "x", "b": [1, 2]}
    storage.write_json_atomic(storage.join(base, "v.json"), {"version": 1})
    assert storage.read_versioned_json(storage.join(base, "v.json"), "version", 1, "hint") == {"version": 1}
    with pytest.raises(FileNotFoundError, match="no w.json in .*: hint"):
        storage.read_versioned_json(storage.join(base, "w.json"), "version", 1, "hint")
    storage.delete(uri)
    storage.delete(uri)  # deleting an absent file is not an error
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError) as err:
        storage.read_bytes(uri)
    assert one_line_naming(err.value, uri)
    assert not [n for n in storage.list_files(base) if n.endswith(".tmp")]


def test_upload_download_and_list(base, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    for name in ("b/2.bin", "a.bin", "b/1.bin", ".entries/x.json"):
        storage.upload_file(src, storage.join(base, name))
    assert storage.list_files(base) == [".entries/x.json", "a.bin", "b/1.bin", "b/2.bin"]
    assert storage.list_files(storage.join(base, "b")) == ["1.bin", "2.bin"]
    assert storage.list_files(storage.join(base, "absent")) == []
    target = tmp_path / "down" / "copy.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    storage.download_file(storage.join(base, "b/1.bin"), target)
    assert target.read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError) as err:
        storage.download_file(storage.join(base, "b/3.bin"), target)
    assert one_line_naming(err.value, storage.join(base, "b/3.bin"))
    assert target.read_bytes() == src.read_bytes() and [p.name for p in target.parent.iterdir()] == ["copy.bin"]
    with pytest.raises(FileNotFoundError):
        storage.upload_file(tmp_path / "absent.bin", storage.join(base, "x.bin"))


def test_publish_dir_writes_manifests_last_and_skips_temporary_files(base, tmp_path):
    src = tmp_path / "split"
    for name in ("manifest.json", "train-000001.tar", "train-000000.tar", "val/manifest.json", "val/val-0.tar",
                 ".train-000002.tar.abc.tmp"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(name.encode())
    order = storage.publish_dir(src, storage.join(base, "split"))
    assert order[-2:] == ["manifest.json", "val/manifest.json"] and len(order) == 5
    assert storage.list_files(storage.join(base, "split")) == sorted(order)
    assert storage.read_bytes(storage.join(base, "split", "val/val-0.tar")) == b"val/val-0.tar"


# ------------------------------------------------------------------------------------------------ large files
def test_a_large_file_goes_up_in_parts_and_comes_back_identical(proxy, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_S3_MULTIPART_THRESHOLD", str(5 * _MiB))
    monkeypatch.setenv("LIGHTCLIP_S3_MULTIPART_CHUNKSIZE", str(5 * _MiB))  # S3's smallest part
    big = tmp_path / "checkpoint.pt"
    big.write_bytes(os.urandom(11 * _MiB))
    uri = f"s3://{bucket}/ckpt/checkpoint.pt"
    storage.upload_file(big, uri)
    parts = sorted(q for m, p, q in proxy.seen if m == "PUT" and p.endswith("checkpoint.pt") and "partNumber" in q)
    assert len(parts) == 3
    assert storage.stat(uri).etag.strip('"').endswith("-3") and storage.stat(uri).size == 11 * _MiB
    storage.download_file(uri, tmp_path / "back.pt")
    assert storage.sha256_file(tmp_path / "back.pt") == storage.sha256_file(big)


def test_an_upload_that_fails_midway_leaves_nothing_under_the_final_key(proxy, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_S3_MULTIPART_THRESHOLD", str(5 * _MiB))
    monkeypatch.setenv("LIGHTCLIP_S3_MULTIPART_CHUNKSIZE", str(5 * _MiB))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    big = tmp_path / "shard.tar"
    big.write_bytes(os.urandom(11 * _MiB))
    uri = f"s3://{bucket}/data/shard.tar"
    proxy.rules.append(fail_first(99, 500, "PUT", "shard.tar", "partNumber=2"))
    with pytest.raises(OSError) as err:
        storage.upload_file(big, uri)
    assert one_line_naming(err.value, uri) and "InternalError" in str(err.value)
    assert storage.list_files(f"s3://{bucket}/data") == [] and not storage.exists(uri)
    uploads = storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # the multipart upload was aborted: no parts left behind either


# ------------------------------------------------------------------------------------------------ retries
def test_transient_server_errors_are_retried_with_backoff(proxy, bucket, monkeypatch):
    uri = f"s3://{bucket}/m.json"
    storage.write_json_atomic(uri, {"ok": True})
    proxy.rules.append(fail_first(1, 503, "GET", "/m.json"))
    proxy.rules.append(fail_first(1, 500, "PUT", "/n.json"))
    assert storage.read_json(uri) == {"ok": True}
    storage.write_json_atomic(f"s3://{bucket}/n.json", {"n": 1})
    assert [m for m, p, _ in proxy.seen if p.endswith("/m.json")] == ["PUT", "GET", "GET"]
    assert [m for m, p, _ in proxy.seen if p.endswith("/n.json")] == ["PUT", "PUT"]
    assert storage.read_json(f"s3://{bucket}/n.json") == {"n": 1}


def test_retries_stop_after_aws_max_attempts_with_one_line(proxy, bucket, monkeypatch):
    uri = f"s3://{bucket}/always-failing.json"
    proxy.rules.append(fail_first(99, 503, "GET", "/always-failing.json"))
    for attempts in (1, 3):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))
        proxy.seen.clear()
        with pytest.raises(OSError) as err:
            storage.read_bytes(uri)
        assert one_line_naming(err.value, uri) and "SlowDown" in str(err.value)
        assert len([p for _, p, _ in proxy.seen if p.endswith("/always-failing.json")]) == attempts


# ------------------------------------------------------------------------------------------------ publication
def test_s3_publish_dir_uploads_the_manifest_last_and_not_at_all_after_a_failure(proxy, bucket, tmp_path,
                                                                                  monkeypatch):
    src = tmp_path / "split"
    src.mkdir()
    for name in ("manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"):
        (src / name).write_bytes(name.encode())
    dest = f"s3://{bucket}/data/train"
    storage.publish_dir(src, dest)
    puts = [p.rpartition("/")[2] for m, p, _ in proxy.seen if m == "PUT"]
    assert puts[-1] == "manifest.json" and sorted(puts) == sorted(p.name for p in src.iterdir())

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy.rules.append(fail_first(99, 500, "PUT", "again/train-000001.tar"))
    with pytest.raises(OSError, match="again/train-000001.tar"):
        storage.publish_dir(src, f"s3://{bucket}/data/again")
    assert "manifest.json" not in storage.list_files(f"s3://{bucket}/data/again")


def test_local_publish_dir_stops_before_the_manifest_when_a_file_fails(tmp_path):
    src = tmp_path / "split"
    src.mkdir()
    for name in ("manifest.json", "train-000000.tar", "train-000001.tar"):
        (src / name).write_bytes(name.encode())
    dest = tmp_path / "published"
    (dest / "train-000001.tar").mkdir(parents=True)  # a directory where a shard goes: the rename fails
    with pytest.raises(OSError):
        storage.publish_dir(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    assert storage.list_files(dest) == ["train-000000.tar"]  # no manifest, no temporary file


# ------------------------------------------------------------------------------------------------ errors
def test_missing_objects_and_buckets_are_file_not_found(bucket, tmp_path):
    for uri in (f"s3://{bucket}/absent.json", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.json"):
        for call in (storage.read_bytes, lambda u: storage.download_file(u, tmp_path / "x")):
            with pytest.raises(FileNotFoundError) as err:
                call(uri)
            assert one_line_naming(err.value, uri)
    missing_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        storage.read_bytes(f"{missing_bucket}/x.json")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        storage.upload_file(src, f"{missing_bucket}/f.bin")
    assert one_line_naming(err.value, f"{missing_bucket}/f.bin")
    with pytest.raises(FileNotFoundError):
        storage.list_files(f"{missing_bucket}/prefix")
    assert not storage.exists(f"{missing_bucket}/x.json")


def test_an_unreachable_endpoint_fails_in_bounded_time_with_one_line(bucket, monkeypatch, caplog):
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    uri = f"s3://{bucket}/m.json"
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(OSError) as err:
        storage.read_bytes(uri)
    assert time.monotonic() - started < 10
    assert one_line_naming(err.value, uri) and f"127.0.0.1:{port}" in str(err.value)
    assert SECRET not in caplog.text  # not even botocore's debug log has the secret (it shows the key id there)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and KEY_ID in r.getMessage()]


def test_refused_credentials_are_a_permission_error_without_the_credentials(bucket, s3_server):
    uri = f"s3://{bucket}/m.json"
    storage.write_bytes_atomic(uri, b"{}")
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:  # from here on the server checks credentials, and it knows no user with these
        with pytest.raises(PermissionError) as err:
            storage.read_bytes(uri)
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    assert one_line_naming(err.value, uri) and "InvalidAccessKeyId" in str(err.value)
    chained = err.value.__cause__ or err.value.__context__
    assert chained is None or (KEY_ID not in str(chained) and SECRET not in str(chained))


def _closed_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ DVC remote
def test_dvc_push_and_pull_through_an_s3_remote(bucket, s3_env, tmp_path):
    """The real `dvc` with an S3 remote on the local server: what `dvc pull` restores is byte-identical."""
    dvc = str(Path(sys.executable).parent / "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "config", "core.site_cache_dir", str(tmp_path / "site-cache"))
    data = repo / "shard.tar"
    data.write_bytes(os.urandom(300_000))
    expected = storage.sha256_file(data)
    run(dvc, "add", "-q", "shard.tar")
    run(dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvcstore")
    run(dvc, "remote", "modify", "store", "endpointurl", s3_env)
    output = run(dvc, "push")
    assert KEY_ID not in output and SECRET not in output
    assert [n for n in storage.list_files(f"s3://{bucket}/dvcstore") if n.startswith("files/md5/")]

    shutil.rmtree(repo / ".dvc" / "cache")
    data.unlink()
    run(dvc, "pull")
    assert storage.sha256_file(data) == expected


# ------------------------------------------------------------------------------------------ interrupted writes
_WRITER = """
import sys, time
from lightclip_core.infra.storage import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a shard")
    print(tmp, flush=True)
    time.sleep(600)
"""


def _writer_in_flight(final: Path) -> tuple[subprocess.Popen, Path]:
    """A process inside `atomic_path(final)`, with half its file written; returns it and its temporary file."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_sweep_removes_what_killed_writers_left_and_nothing_else(tmp_path, caplog):
    out = tmp_path / "out"
    killed, orphan = _writer_in_flight(out / "train" / "train-000001.tar")
    killed.kill()  # SIGKILL: atomic_path's cleanup never runs
    killed.wait()
    alive, in_flight = _writer_in_flight(out / "train" / "train-000002.tar")  # another worker, still writing
    try:
        assert orphan.name.startswith(".train-000001.tar.") and orphan.name.endswith(".tmp") and orphan.exists()
        others = [out / "train" / n for n in ("train-000000.tar", "notes.tmp", ".hidden.tmp", ".x.tar.abc.tmp",
                                              ".x.tar.ABCDEFGH.tmp")]
        for path in others:
            path.write_bytes(b"not ours to remove")
        with caplog.at_level(logging.INFO, logger="lightclip_core.infra.storage"):
            assert storage.sweep_stale_tmp(out) == [orphan]
        assert not orphan.exists() and in_flight.exists() and all(p.exists() for p in others)
        assert [r.getMessage() for r in caplog.records] == [
            f"removed 1 temporary file(s) that interrupted writes left under {out}"]
        assert storage.sweep_stale_tmp(out) == []  # nothing left to remove: no line
        assert len(caplog.records) == 1
    finally:
        alive.kill()
        alive.wait()
    assert storage.sweep_stale_tmp(out) == [in_flight]  # once its writer is gone
    assert storage.sweep_stale_tmp(tmp_path / "absent") == [] and storage.sweep_stale_tmp("s3://bucket/out") == []


def test_a_finished_write_leaves_no_temporary_file_and_keeps_its_mode(tmp_path):
    storage.write_bytes_atomic(tmp_path / "a.bin", b"x")
    with pytest.raises(RuntimeError):
        with storage.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == storage._FILE_MODE


def test_a_stage_sweeps_its_output_before_it_writes(tmp_path):
    from lightclip_core.config import Config
    from lightclip_core.stages import run_prepare

    out = tmp_path / "data"
    killed, orphan = _writer_in_flight(out / "train" / "train-000000.tar")
    killed.kill()
    killed.wait()
    cfg = Config.model_validate({"tracking": {"enabled": False}, "data": {"samples_per_shard": 8, "synthetic": {
        "num_train": 8, "num_val": 4, "num_test": 4, "image_size": 16}}})
    run_prepare(cfg=cfg, out=out)
    assert not orphan.exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("text,shown", [
    ("https://bob:s3cret@mlflow.example.com:5000/base", "https://***@mlflow.example.com:5000/base"),
    ("http://token@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("s3://bucket/key@1.tar", "s3://bucket/key@1.tar"),
    ("https://b.s3.example.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12",
     "https://b.s3.example.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://host/x?sig=abc&sv=2024&access_token=t0k#top", "https://host/x?sig=***&sv=2024&access_token=***#top"),
    ("API request to http://u:p4ss@h:1/api/2.0/mlflow/runs/get failed (R@1 at http://h/a@b)",
     "API request to http://***@h:1/api/2.0/mlflow/runs/get failed (R@1 at http://h/a@b)"),
])
def test_credentials_in_uris_are_masked_in_text(text, shown):
    assert storage.redact_uri(text) == shown
