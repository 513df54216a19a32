"""A journal of one run's tracking operations, delivered in order by a background thread.

A stage must neither stall nor lose data when the tracking server goes away. Every operation of a run (metrics,
tags, an artifact, the end of the run) is first appended to `<spool_dir>/<run_id>.jsonl`; a thread delivers the
operations in order and appends an acknowledgement for each. While the server is unreachable the thread retries
with a capped backoff, so the stage goes on and everything arrives when the server returns. What is still
unacknowledged when the stage ends stays on disk, and `lightclip tracking sync` (:func:`sync_spool`) delivers it
later. Each operation is idempotent on the server (MLflow keeps one copy of an identical metric, tags and artifacts
are overwritten), so an operation that was delivered but not acknowledged may safely be sent again.

The stage's process holds a lock on its journal until it ends the run (the `end` operation). A journal that nobody
holds and that has no `end` belongs to a process that died (kill -9, out of memory, a lost node): `sync` delivers
what it holds and then ends its run with status KILLED, so that no run stays RUNNING for ever.

During an outage the thread logs one line when the server becomes unreachable and one when it is back; urllib3's
warning for every retried request to MLflow is dropped (:func:`quiet_http_retries`).

Journal lines: a header `{"header": {"run_id", "tracking_uri", "parent_run_id"}}` (the URI without credentials),
operations `{"seq": n, "op": ...}` and acknowledgements `{"ack": n}` (with `"error"` when the server refused it for
good).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from lightclip_core.infra.storage import redact_uri

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
_BACKOFF_START_S, _BACKOFF_MAX_S = 1.0, 30.0
# Errors a retry cannot fix: the server understood the request and refused it. 401/403 are left out on purpose:
# credentials can be fixed before `lightclip tracking sync`.
_PERMANENT_HTTP = set(range(400, 500)) - {401, 403, 408, 429}


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached (or refuses our credentials). The message is one line."""


def first_line(err: BaseException) -> str:
    """The first line of an error, credentials masked (MLflow's messages carry the request's full URL)."""
    return redact_uri((str(err).splitlines() or [type(err).__name__])[0])[:200]  # masked before it is cut


class _MlflowRetryNoise(logging.Filter):
    """urllib3 warns once per retried attempt ("Retrying (Retry(total=2, ...)) after connection broken by ...");
    during an outage that is a line every few seconds. For requests to MLflow the outbox reports the outage itself,
    once when it starts and once when it ends."""

    def filter(self, record: logging.LogRecord) -> bool:
        url = record.args[-1] if isinstance(record.args, tuple) and record.args else ""
        return not (str(record.msg).startswith("Retrying (") and "/mlflow" in str(url))


def quiet_http_retries() -> None:
    """Drop urllib3's per-attempt retry warnings for MLflow requests (idempotent)."""
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _MlflowRetryNoise) for f in logger.filters):
        logger.addFilter(_MlflowRetryNoise())


Op = dict[str, Any]


# ------------------------------------------------------------------------------------------------ journal
class Journal:
    """The append-only file of one run. Holds an exclusive lock while open so that `sync` leaves it alone."""

    def __init__(self, path: Path, header: dict[str, Any] | None = None):
        self.path = path
        self.files_dir = path.with_suffix(".files")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise
        self._lock = threading.Lock()
        self._closed = False
        self.header, self.pending, self._seq, self.ended = read_journal(path)
        if header is not None and self.header is None:
            self.header = header
            self._write({"header": header})

    def _write(self, record: dict[str, Any]) -> None:
        # flush, no fsync: this survives a crash of the process, which is the failure that matters here
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def append(self, op: Op) -> int:
        with self._lock:
            self._seq += 1
            self._write({"seq": self._seq, **op})
            self.ended = self.ended or op["op"] == "end"
            return self._seq

    def ack(self, seq: int, error: str | None = None) -> None:
        with self._lock:
            if not self._closed:  # an abandoned delivery thread must not write after close
                self._write({"ack": seq, **({"error": error} if error else {})})

    def close(self, remove: bool) -> None:
        """Release the lock; `remove` deletes the journal and its copied files (everything was delivered)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if remove:
                self.path.unlink(missing_ok=True)
                shutil.rmtree(self.files_dir, ignore_errors=True)
            self._file.close()


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[tuple[int, Op]], int, bool]:
    """The header, the unacknowledged operations in order, the last sequence number of a journal, and whether it
    holds the end of its run."""
    header, ops, acked, last = None, {}, set(), 0
    if not path.exists():
        return None, [], 0, False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: the operation never counted as logged
            continue
        if "header" in record:
            header = record["header"]
        elif "ack" in record:
            acked.add(record["ack"])
        elif "seq" in record:
            seq = record.pop("seq")
            ops[seq], last = record, max(last, seq)
    ended = any(op.get("op") == "end" for op in ops.values())
    return header, [(s, op) for s, op in sorted(ops.items()) if s not in acked], last, ended


# ----------------------------------------------------------------------------------------------- delivery
def is_permanent(err: Exception) -> bool:
    """True when retrying cannot help: the server refused the request, or a local file is gone."""
    from mlflow.exceptions import RestException

    if isinstance(err, RestException):
        return err.get_http_status_code() in _PERMANENT_HTTP
    return isinstance(err, FileNotFoundError)


def next_group(ops: Iterable[tuple[int, Op]]) -> list[tuple[int, Op]]:
    """The operations to deliver in one request: consecutive metric operations (up to the batch limit), or one."""
    group: list[tuple[int, Op]] = []
    count = 0
    for seq, op in ops:
        if op["op"] != "metrics":
            return group or [(seq, op)]
        if group and count + len(op["metrics"]) > MAX_METRICS_PER_BATCH:
            break
        group.append((seq, op))
        count += len(op["metrics"])
    return group


def deliver(client: Any, run_id: str, group: list[tuple[int, Op]], files_dir: Path) -> None:
    """Send one group of operations (see :func:`next_group`) to the tracking server."""
    from mlflow.entities import Metric

    first = group[0][1]
    kind = first["op"]
    if kind == "metrics":
        metrics = [Metric(k, v, ts, step) for _, op in group for k, v, ts, step in op["metrics"]]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):  # one op alone may exceed the limit
            client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=_tag_entities(first["tags"]), synchronous=True)
    elif kind == "artifact":
        local = files_dir / first["path"]
        if local.is_dir():
            client.log_artifacts(run_id, str(local), first.get("artifact_path"))
        elif local.is_file():
            client.log_artifact(run_id, str(local), first.get("artifact_path"))
        else:
            raise FileNotFoundError(f"spooled artifact {local} is missing")
    elif kind == "end":
        client.set_terminated(run_id, first["status"], first["end_time"])
        parent = first.get("parent_run_id")
        # The pipeline run shows the state of its latest stage; a killed stage found later (by `sync`) leaves a
        # pipeline run alone that has moved on since (a retry finished it).
        if parent and (first["status"] != "KILLED" or client.get_run(parent).info.status == "RUNNING"):
            client.set_terminated(parent, first["status"], first["end_time"])
    else:
        raise ValueError(f"unknown spooled operation {kind!r}")


def _tag_entities(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


# ------------------------------------------------------------------------------------------------- outbox
class Outbox:
    """Journal + delivery thread for one run: `put` never waits for the network."""

    def __init__(self, spool_dir: str | Path, run_id: str, tracking_uri: str, parent_run_id: str | None = None):
        from mlflow import MlflowClient

        quiet_http_retries()
        self.run_id = run_id
        header = {"run_id": run_id, "tracking_uri": redact_uri(tracking_uri), "parent_run_id": parent_run_id}
        self.journal = Journal(Path(spool_dir) / f"{run_id}.jsonl", header)
        self._client = MlflowClient(tracking_uri)
        self._queue: deque[tuple[int, Op]] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._closing = False
        self._deadline = float("inf")
        self._abandoned = False
        self._outage_reported = False
        self._copies = 0
        self._thread = threading.Thread(target=self._run, name=f"lightclip-outbox-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def files_dir(self) -> Path:
        return self.journal.files_dir

    def put(self, op: Op) -> None:
        seq = self.journal.append(op)
        with self._cond:
            self._queue.append((seq, op))
            self._cond.notify()

    def spool_artifact(self, path: Path, artifact_path: str | None) -> None:
        """Copy the file or directory now (the stage may overwrite it later), deliver the copy."""
        self._copies += 1
        target = self.files_dir / f"{self._copies:06d}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        self.put({"op": "artifact", "path": str(target.relative_to(self.files_dir)), "artifact_path": artifact_path})

    def _next(self) -> list[tuple[int, Op]] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue or self._abandoned:
                return None
            return next_group(list(self._queue))

    def _run(self) -> None:
        delay = _BACKOFF_START_S
        while (group := self._next()) is not None:
            try:
                deliver(self._client, self.run_id, group, self.files_dir)
                error = None
            except Exception as err:  # noqa: BLE001 - every failure is either retried or recorded
                if not is_permanent(err):
                    self._report_outage(err)
                    if self._wait(delay):
                        return
                    delay = min(delay * 2, _BACKOFF_MAX_S)
                    continue
                error = redact_uri(f"{type(err).__name__}: {err}")
                log.error("tracking server refused %s for run %s: %s", group[0][1]["op"], self.run_id, error)
            if self._outage_reported:
                log.warning("tracking server reachable again; delivering the spooled operations of run %s",
                            self.run_id)
                self._outage_reported = False
            delay = _BACKOFF_START_S
            for seq, _ in group:
                self.journal.ack(seq, error)
            with self._cond:
                for _ in group:
                    self._queue.popleft()
                self._cond.notify_all()

    def _wait(self, delay: float) -> bool:
        """Back off; a close wakes us for one more try. True when the close deadline has passed: give up."""
        with self._cond:
            if self._abandoned or time.monotonic() >= self._deadline:
                return True
            remaining = self._deadline - time.monotonic()
        self._wake.wait(min(delay, max(remaining, 0.0)))
        self._wake.clear()
        return False

    def _report_outage(self, err: Exception) -> None:
        if not self._outage_reported:
            self._outage_reported = True
            log.warning("tracking server unreachable (%s); the stage goes on, run %s is spooled in %s",
                        first_line(err), self.run_id, self.journal.path)

    def close(self, timeout: float) -> int:
        """Wait up to `timeout` s for delivery; keep what is left in the journal. Returns the undelivered count."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(timeout + 1.0)
        with self._cond:
            self._abandoned = True  # a thread still inside a request stops at its next step
            left = len(self._queue)
            self._cond.notify_all()
        self.journal.close(remove=left == 0)
        return left


# --------------------------------------------------------------------------------------------------- sync
def sync_spool(spool_dir: str | Path) -> dict[str, int]:
    """Deliver every journal left in `spool_dir` to the server it was meant for; {run_id: operations delivered}.

    Journals in use by a running stage are skipped. The run of a journal whose process died before ending it is
    ended with status KILLED (at the time of the journal's last write) after its operations. Raises
    :class:`TrackingUnavailable` if a server is still unreachable; what was delivered until then stays acknowledged.
    """
    from mlflow import MlflowClient

    quiet_http_retries()
    delivered: dict[str, int] = {}
    for path in sorted(Path(spool_dir).glob("*.jsonl")):
        try:
            journal = Journal(path)
        except BlockingIOError:
            log.info("%s is in use by a running stage; skipped", path)
            continue
        try:
            if journal.header is None:
                log.warning("%s has no header; left in place", path)
                continue
            run_id, uri = journal.header["run_id"], delivery_uri(journal.header["tracking_uri"])
            if not journal.ended:  # nobody holds the journal, yet its run never ended: its process died
                log.warning("run %s: its process died before ending it; it is ended as KILLED", run_id)
                end = {"op": "end", "status": "KILLED", "end_time": int(path.stat().st_mtime * 1000),
                       "parent_run_id": journal.header.get("parent_run_id")}
                journal.pending.append((journal.append(end), end))
            delivered[run_id] = _drain(MlflowClient(uri), run_id, uri, journal)
            journal.close(remove=True)
        finally:
            journal.close(remove=False)
    return delivered


def delivery_uri(recorded: str) -> str:
    """The URI to deliver a journal to: the journal keeps it without credentials; when the current
    `MLFLOW_TRACKING_URI` is the same server, that one (with its credentials) is used."""
    current = os.environ.get("MLFLOW_TRACKING_URI")
    if current and redact_uri(current) == recorded:
        return current
    return recorded.replace("://***@", "://", 1)


def _drain(client: Any, run_id: str, uri: str, journal: Journal) -> int:
    pending = list(journal.pending)
    count = 0
    while pending:
        group = next_group(pending)
        error = None
        try:
            deliver(client, run_id, group, journal.files_dir)
        except Exception as err:  # noqa: BLE001
            if not is_permanent(err):
                raise TrackingUnavailable(f"run {run_id}: tracking server {redact_uri(uri)} unreachable "
                                          f"({first_line(err)}); {len(pending)} operations kept in {journal.path}"
                                          ) from None
            error = redact_uri(f"{type(err).__name__}: {err}")
            log.error("tracking server refused %s for run %s: %s", group[0][1]["op"], run_id, error)
        for seq, _ in group:
            journal.ack(seq, error)
        pending = pending[len(group):]
        count += len(group) if error is None else 0
    return count
