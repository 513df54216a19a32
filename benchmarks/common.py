"""Shared by the benchmarks: machine description, a small synthetic dataset, and result publication.

Each benchmark writes `benchmarks/results/<name>.json` and replaces its own row in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLE = ROOT / "docs" / "BENCHMARKS.md"
TABLE_HEADER = ("| benchmark | measured | reference | ratio | machine | date | command |\n"
                "|---|---|---|---|---|---|---|\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} cores {cpu}{gpu}, torch {torch.__version__}"


# Fields added to the schema after benchmark runs were kept, at the value that reproduces what those runs did: left
# out of a run's key at that value, so the kept runs stay found (and at any other value the key says so).
KEY_NEUTRAL_FIELDS: dict[tuple[str, ...], Any] = {
    ("objectives", "distill", "synthetic_filter_margin"): None,  # issue #16's filter, 2026-12-07: off
}


def config_key(cfg, *extra: bytes) -> str:
    """12 hex digits of a hash of the resolved configuration (and `extra`, e.g. the stored views' manifest): what
    names a kept benchmark run, so that a changed default or changed views never reuse an old one. A field of
    KEY_NEUTRAL_FIELDS at its neutral value is left out."""
    import hashlib

    dump = cfg.model_dump(mode="json")
    for path, neutral in KEY_NEUTRAL_FIELDS.items():
        *parents, name = path
        section = dump
        for part in parents:
            section = section.get(part, {})
        if name in section and section[name] == neutral:
            del section[name]
    digest = hashlib.sha256(json.dumps(dump, sort_keys=True).encode())
    for part in extra:
        digest.update(part)
    return digest.hexdigest()[:12]


def train_step_times(cfg, train_dir: Path) -> list[float]:
    """Seconds per step of a short run of the product's training (batch / samples per second of its log), the first
    two steps left out; in a scratch directory."""
    import csv
    import tempfile

    from lightclip_core.train.trainer import train
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, train_dir, Path(tmp) / "train")
        with open(result.train_log) as f:
            rows = list(csv.DictReader(f))
    return [cfg.train.batch_size / float(r["samples_per_s"]) for r in rows[2:]]


def median_after_warmup(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:] if len(values) > warmup else values)


def publish(name: str, result: dict[str, Any], measured: str, reference: str, ratio: float, command: str) -> None:
    """Write the JSON result and put this benchmark's row into the table (one row per benchmark name)."""
    result = {"name": name, "machine": machine(), "date": date.today().isoformat(), "command": command, **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    row = (f"| {name} | {measured} | {reference} | {ratio:.2f} | {result['machine']} | {result['date']} "
           f"| `{command}` |\n")
    text = TABLE.read_text() if TABLE.exists() else "# Benchmarks\n\n"
    if TABLE_HEADER not in text:
        text = text.rstrip("\n") + "\n\n" + TABLE_HEADER
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith(f"| {name} |")]
    header_end = "".join(lines).index(TABLE_HEADER) + len(TABLE_HEADER)
    text = "".join(lines)
    TABLE.write_text(text[:header_end] + row + text[header_end:])
    print(json.dumps(result, indent=2))


def replace_section(section: str) -> None:
    """Put `section` (a markdown section starting with its `## ` title line) into docs/BENCHMARKS.md, replacing the
    section of the same title up to the next `## ` title, or appending it."""
    title = section.splitlines()[0]
    text = TABLE.read_text()
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    TABLE.write_text(text)
