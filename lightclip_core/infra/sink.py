"""Where a long-running step sends its curves: anything with `log_metrics` (an MLflow stage run, a test's list)."""
from __future__ import annotations

from typing import Protocol


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class PrefixedSink:
    """A metric sink that prefixes every key (a second model's curves next to the first's)."""

    def __init__(self, sink: MetricSink, prefix: str):
        self.sink, self.prefix = sink, prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.sink.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=step)
