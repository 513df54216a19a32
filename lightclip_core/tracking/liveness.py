"""Runs whose process died: a stage killed with SIGKILL (or out of memory, or on a lost node) cannot end its MLflow
run, which would then stay RUNNING for ever. Each stage run records its owner, and the next stage of the experiment
ends the runs whose owner is gone with status KILLED (`lightclip tracking sync` does the same from the spool, see
:mod:`lightclip_core.tracking.spool`).

Owner tags: `lightclip.owner.host` (host name), `lightclip.owner.pid`, `lightclip.owner.started` (the process's
start time, ms: a pid the system has given to another process since does not count) and
`lightclip.owner.pid_space` (the machine's boot id and the pid namespace: a pid means something only within one
boot of one machine and one namespace, and two machines, or two containers, may share a host name). A heartbeat
tag, `lightclip.heartbeat` (ms), is refreshed every :data:`HEARTBEAT_INTERVAL_S` while the stage runs.

Who decides that an owner is gone:
- in the owner's pid space (same host name, boot and pid namespace): the process is gone, or the pid now belongs
  to another process. This is certain, so such a run is ended at once.
- from another host (a Kubernetes pod, another machine): no heartbeat for `$LIGHTCLIP_RUN_STALE_AFTER_S`
  (default 900 s). A run on a host that cannot reach the server for longer than that (an outage seen from there only)
  is ended too; when that stage finishes, its own end (FINISHED or FAILED) replaces KILLED.
Runs without owner tags (from older versions, or from other tools) are left alone, and so is a run whose journal in
the spool holds its end: its process ended it during an outage, and `sync` delivers the real status.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from lightclip_core.tracking.spool import first_line, read_journal

log = logging.getLogger(__name__)

OWNER_HOST, OWNER_PID, OWNER_STARTED, OWNER_PID_SPACE = ("lightclip.owner.host", "lightclip.owner.pid",
                                                         "lightclip.owner.started", "lightclip.owner.pid_space")
HEARTBEAT_TAG = "lightclip.heartbeat"
ENDED_BY_TAG = "lightclip.ended_by"
PARENT_TAG = "mlflow.parentRunId"
HEARTBEAT_INTERVAL_S = 60.0
STALE_AFTER_ENV = "LIGHTCLIP_RUN_STALE_AFTER_S"
_DEFAULT_STALE_AFTER_S = 900.0
_START_TOLERANCE_MS = 1000  # psutil's start times of one process agree to well within a second
_MAX_RUNNING = 1000


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pid_space() -> str:
    """`<boot id>/<pid namespace>` on Linux; elsewhere empty (the host name alone)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def owner_tags() -> dict[str, str]:
    """The tags that say which process owns a run, and its first heartbeat."""
    import psutil

    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()),
            OWNER_STARTED: str(int(psutil.Process().create_time() * 1000)), OWNER_PID_SPACE: _pid_space(),
            HEARTBEAT_TAG: str(_now_ms())}


def _process_alive(pid: int, started_ms: int) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() * 1000 - started_ms) > _START_TOLERANCE_MS:
            return False  # the pid was given to another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # not ours to inspect: it exists
        return True


def why_abandoned(tags: Mapping[str, str], now_ms: int | None = None) -> str | None:
    """Why the run with these tags has no living owner, or None while it may have one (see the module docstring)."""
    host, pid, started = tags.get(OWNER_HOST), tags.get(OWNER_PID), tags.get(OWNER_STARTED)
    if not (host and pid and started):
        return None
    try:
        pid_, started_ = int(pid), int(started)
        beat = int(tags.get(HEARTBEAT_TAG) or started)
    except ValueError:
        return None
    if host == socket.gethostname() and tags.get(OWNER_PID_SPACE, "") == _pid_space():
        return None if _process_alive(pid_, started_) else f"its process {pid} on {host} is gone"
    stale_after_s = float(os.environ.get(STALE_AFTER_ENV) or _DEFAULT_STALE_AFTER_S)
    silent_s = ((now_ms if now_ms is not None else _now_ms()) - beat) / 1000
    if silent_s > stale_after_s:
        return f"no heartbeat from {host} for {silent_s:.0f} s (more than {STALE_AFTER_ENV}={stale_after_s:.0f})"
    return None


def end_abandoned_runs(client: Any, experiment_id: str, spool_dir: Path | None = None) -> list[str]:
    """End with status KILLED every RUNNING run of the experiment whose owner is gone (and whose end is not waiting
    in `spool_dir`); returns their ids. The end time is the owner's last heartbeat; the run's pipeline run, if still
    RUNNING, ends with it. A run this process may not change is reported and left as it is."""
    running = client.search_runs([experiment_id], max_results=_MAX_RUNNING, filter_string=(
        f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` LIKE '%'"))
    ended = []
    for run in running:
        tags = run.data.tags
        run_id = run.info.run_id
        reason = why_abandoned(tags)
        if reason is None or (spool_dir is not None and read_journal(Path(spool_dir) / f"{run_id}.jsonl")[3]):
            continue
        end_time = max(int(tags.get(HEARTBEAT_TAG) or 0), run.info.start_time or 0) or _now_ms()
        try:
            client.set_tag(run_id, ENDED_BY_TAG, f"{reason}; ended by {socket.gethostname()} pid {os.getpid()}")
            client.set_terminated(run_id, "KILLED", end_time)
            parent = tags.get(PARENT_TAG)
            if parent and client.get_run(parent).info.status == "RUNNING":
                client.set_terminated(parent, "KILLED", end_time)
        except Exception as err:  # noqa: BLE001 - another user's run, a server hiccup: the stage goes on
            log.warning("run %s (%s) looks abandoned (%s) but could not be ended: %s", run_id,
                        tags.get("stage", run.info.run_name), reason, first_line(err))
            continue
        log.warning("run %s (%s) was left RUNNING: %s; ended as KILLED", run_id,
                    tags.get("stage", run.info.run_name), reason)
        ended.append(run_id)
    return ended


class Heartbeat:
    """Refreshes the run's heartbeat tag every `interval` seconds from a daemon thread. It is not data: it goes
    straight to the server, not through the spool, and a failed beat is only logged at debug level (the outbox
    reports outages)."""

    def __init__(self, tracking_uri: str, run_id: str, interval: float = HEARTBEAT_INTERVAL_S):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.interval = interval
        self._client = MlflowClient(tracking_uri)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lightclip-heartbeat-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._client.set_tag(self.run_id, HEARTBEAT_TAG, str(_now_ms()))
            except Exception as err:  # noqa: BLE001
                log.debug("heartbeat of run %s not delivered: %s", self.run_id, first_line(err))

    def stop(self) -> None:
        """Stop beating; a beat in flight is not waited for (the thread is a daemon)."""
        self._stop.set()
