"""System metrics (CPU, memory, disk, network, and NVIDIA/AMD GPUs when present) sampled during a stage.

MLflow's collectors do the measuring; the samples go through the stage's spool like every other metric. MLflow's
own monitor thread is not used because it stops for good at the first failed request, so an outage would end
the system metrics of a run. Keys carry the `system/` prefix, which the MLflow UI shows in its system metrics tab.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, float], int], None]


def _collectors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    collectors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for module, name in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
        try:  # raises when the vendor library or the device is absent
            mod = __import__(f"mlflow.system_metrics.metrics.{module}", fromlist=[name])
            collectors.append(getattr(mod, name)())
            break
        except Exception:  # noqa: BLE001
            log.debug("no %s", name, exc_info=True)
    return collectors


class SystemMetricsSampler:
    """Samples every `interval_s` seconds on a daemon thread, and once more at `stop`; step = sample index."""

    def __init__(self, sink: Sink, interval_s: float):
        self._sink = sink
        self._interval = interval_s
        self._stop = threading.Event()
        self._step = 0
        self._collectors = _collectors()
        self._sample(publish=False)  # CPU utilisation is measured between two calls: prime the counters
        self._thread = threading.Thread(target=self._loop, name="lightclip-system-metrics", daemon=True)
        self._thread.start()

    def _sample(self, publish: bool = True) -> None:
        values: dict[str, float] = {}
        for collector in self._collectors:
            try:
                collector.collect_metrics()
                values.update(collector.aggregate_metrics())
            except Exception:  # noqa: BLE001 - a broken sensor must not end the stage
                log.debug("system metric collection failed", exc_info=True)
            collector.clear_metrics()
        if publish and values:
            self._sink({f"system/{k}": float(v) for k, v in values.items()}, self._step)
            self._step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
