"""Bad input data, counted per reason and held to one limit, `data.max_skip_fraction`, in every stage that reads it.

A sample that cannot be used is skipped and counted under one of :data:`SAMPLE_REASONS`; a shard that is damaged
as a whole is also counted under one of :data:`SHARD_EVENTS` (a checksum mismatch is only an event: its samples are
then validated one by one and only the bad ones are skipped). The skipped fraction is skipped samples over the
samples the input holds (what was read, plus what a damaged shard's manifest says was lost), and past
`data.max_skip_fraction` the stage stops with a :class:`DataError` (one line, exit code 1) before it publishes.

Reasons, in the metrics as `skipped/<reason>` (plus `skipped/total`):

- `truncated_shard`: samples lost where a shard's tar is cut or garbled: the sample in progress at the damage (never
  kept half) and, when the manifest gives the shard's count, every sample after it;
- `missing_shard`: the samples of a shard the manifest lists but that cannot be opened;
- `missing_image`, `missing_caption`: a sample without an image or a `txt` member;
- `duplicate_member`: a sample with two members of the same extension;
- `undecodable_image`, `undecodable_caption`, `empty_caption`: the image does not decode completely, the caption is
  not UTF-8, or it is blank (ingestion);
- `bad_metadata`: the `json` member does not parse, or lacks the label a zero-shot task needs;
- `bad_reinforcement`: the reinforcement members (`paug.json`, `syn.json`, `npz`) are missing or inconsistent.

Shard events, as `damaged_shards/<event>`: `checksum_mismatch` (the shard's sha256 differs from its manifest),
`truncated` (its tar stops mid-member, lacks its end-of-archive block, or is not a tar) and `missing`.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_REASONS = ("truncated_shard", "missing_shard", "missing_image", "missing_caption", "duplicate_member",
                  "undecodable_image", "undecodable_caption", "empty_caption", "bad_metadata", "bad_reinforcement")
SHARD_EVENTS = ("checksum_mismatch", "truncated", "missing")
LIMIT = "data.max_skip_fraction"
_DETAIL_CHARS = 200


class DataError(ValueError):
    """The input data is unusable (too many bad samples, nothing found, inconsistent class names, a manifest that
    points outside its dataset)."""


class SampleError(ValueError):
    """One sample cannot be used; `reason` is one of SAMPLE_REASONS. Readers skip and count it, never stop on it."""

    reason = "bad_metadata"

    def __init__(self, reason: str, message: str):
        if reason not in SAMPLE_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(message)
        self.reason = reason


def one_line(text: Any) -> str:
    return " ".join(str(text).split())[:_DETAIL_CHARS]


@dataclass
class SkipTally:
    """Samples seen, samples skipped per reason (and per split, for ingestion), damaged shards per event, and the
    first detail of each reason (for the error line)."""

    seen: int = 0
    by_split: dict[str | None, Counter] = field(default_factory=dict)
    shards: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)
    verbose: bool = True  # log the first skip of each reason and every damaged shard as warnings

    def skip(self, reason: str, n: int = 1, split: str | None = None, detail: str | None = None) -> None:
        """Count `n` skipped samples (they are also counted as seen by whoever saw them)."""
        if reason not in SAMPLE_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SAMPLE_REASONS}")
        self.by_split.setdefault(split, Counter())[reason] += n
        if detail and reason not in self.first:
            self.first[reason] = one_line(detail)
            log.log(logging.WARNING if self.verbose else logging.DEBUG, "skipping %s: %s", reason, self.first[reason])
        elif detail:
            log.debug("skipping %s: %s", reason, one_line(detail))

    def shard_event(self, event: str, detail: str | None = None) -> None:
        if event not in SHARD_EVENTS:
            raise ValueError(f"unknown shard event {event!r}; known: {SHARD_EVENTS}")
        self.shards[event] += 1
        log.log(logging.WARNING if self.verbose else logging.DEBUG, "damaged shard (%s)%s", event,
                f": {one_line(detail)}" if detail else "")

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.by_split.values():
            total.update(counts)
        return dict(sorted((k, v) for k, v in total.items() if v))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def split_skipped(self, split: str) -> dict[str, int]:
        return dict(sorted((k, v) for k, v in self.by_split.get(split, Counter()).items() if v))

    def update(self, other: SkipTally) -> None:
        """Add another tally's counts (another shard, worker or rank)."""
        self.seen += other.seen
        for split, counts in other.by_split.items():
            self.by_split.setdefault(split, Counter()).update(counts)
        self.shards.update(other.shards)
        for reason, detail in other.first.items():
            self.first.setdefault(reason, detail)

    # ------------------------------------------------------------------------------------- transport and state
    def vector(self) -> list[int]:
        """The counts as a fixed-length list (seen, each sample reason, each shard event): what a DataLoader worker
        sends along with its samples."""
        skipped = self.skipped
        return [self.seen, *(skipped.get(r, 0) for r in SAMPLE_REASONS), *(self.shards[e] for e in SHARD_EVENTS)]

    def add_vector(self, vector: list[int]) -> None:
        self.seen += int(vector[0])
        reasons = vector[1:1 + len(SAMPLE_REASONS)]
        self.by_split.setdefault(None, Counter()).update({r: int(n) for r, n in zip(SAMPLE_REASONS, reasons) if n})
        events = vector[1 + len(SAMPLE_REASONS):]
        self.shards.update({e: int(n) for e, n in zip(SHARD_EVENTS, events) if n})

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "shards": dict(sorted(self.shards.items())),
                "first": dict(self.first)}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> SkipTally:
        tally = cls()
        if state:
            tally.seen = int(state.get("seen", 0))
            tally.by_split[None] = Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
            tally.shards = Counter({k: int(v) for k, v in state.get("shards", {}).items()})
            tally.first = dict(state.get("first", {}))
        return tally

    def metrics(self) -> dict[str, float]:
        """`skipped/<reason>`, `skipped/total` and `damaged_shards/<event>`, for a stage's metrics and summary."""
        out = {f"skipped/{k}": float(v) for k, v in self.skipped.items()}
        out["skipped/total"] = float(self.total_skipped)
        out.update({f"damaged_shards/{k}": float(v) for k, v in sorted(self.shards.items()) if v})
        return out

    # ------------------------------------------------------------------------------------------ the limit
    def describe(self) -> str:
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.skipped.items()) or "none"
        example = next((f"; first {r}: {self.first[r]}" for r in self.skipped if r in self.first), "")
        return f"{reasons}{example}"

    def check(self, max_fraction: float, source: str, empty_hint: str = "no samples found") -> None:
        """Log the counts; raise DataError if nothing was seen or more than `max_fraction` of it was skipped."""
        if self.seen == 0:
            raise DataError(f"{source}: {empty_hint}")
        n_skipped = self.total_skipped
        if n_skipped:
            log.warning("%s: skipped %d of %d samples (%s)", source, n_skipped, self.seen, self.describe())
        else:
            log.info("%s: all %d samples usable", source, self.seen)
        fraction = n_skipped / self.seen
        if fraction > max_fraction:
            raise DataError(f"{source}: skipped fraction {fraction:.4g} ({n_skipped} of {self.seen}: "
                            f"{self.describe()}) exceeds {LIMIT}={max_fraction}")

    def check_running(self, max_fraction: float, expected: int, source: str) -> None:
        """The limit while a stage is still reading: fail as soon as the skipped samples exceed `max_fraction` of
        the larger of the samples seen and `expected` (the input's size, from its manifests), so a stage stops early
        only when the whole input would fail too."""
        n_skipped = self.total_skipped
        if n_skipped and n_skipped > max_fraction * max(self.seen, expected):
            budget = max(self.seen, expected)
            raise DataError(f"{source}: {n_skipped} samples skipped ({self.describe()}), more than "
                            f"{LIMIT}={max_fraction} of {budget}")
