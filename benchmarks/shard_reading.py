"""What verifying shard checksums on read costs (issue #18): the training split's shards read and their images
decoded, once with the manifest's sha256 checked (a cold verdict cache, as in a new process) and once without, in
the same run, alternating; the ratio of the medians.

    python benchmarks/shard_reading.py [--data artifacts/data/train] [--shards 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, publish  # noqa: E402

from lightclip_core.data.reader import CHECKSUMS, decode_image, decoded, iter_raw_samples  # noqa: E402
from lightclip_core.data.shards import shard_refs  # noqa: E402
from lightclip_core.data.skips import SkipTally  # noqa: E402


def read_all(refs) -> tuple[float, int]:
    """Seconds to read and decode every sample of `refs`, and the number of images."""
    CHECKSUMS.clear()
    tally = SkipTally()
    started = time.perf_counter()
    count = sum(1 for _ in decoded(iter_raw_samples(refs, tally), decode_image, tally))
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "artifacts" / "data" / "train")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    verified = shard_refs(args.data)[:args.shards]
    plain = [replace(ref, sha256=None) for ref in verified]
    times: dict[str, list[float]] = {"verified": [], "plain": []}
    for _ in range(args.repeats):
        for name, refs in (("verified", verified), ("plain", plain)):
            seconds, count = read_all(refs)
            times[name].append(seconds)
    with_sum, without = statistics.median(times["verified"]), statistics.median(times["plain"])
    publish("shard_reading", {"samples": count, "shards": len(verified), "seconds": times},
            measured=f"{count} samples read and decoded with sha256 verified: {with_sum:.2f} s "
                     f"({count / with_sum:.0f} samples/s)",
            reference=f"the same without verification: {without:.2f} s",
            ratio=with_sum / without,
            command=f"python benchmarks/shard_reading.py --shards {args.shards} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
