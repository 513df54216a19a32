"""Issue #16 item 4: what LightCLIP's three objectives cost per training step, with and without distillation.

The four headline arms of `distill_screens.py` (plain CLIP, the objectives alone, distillation alone: the default,
both) each train `--steps` steps on the committed stored views (`artifacts/reinforced/train`, `params.yaml` plus
the arm's overrides) in turn, round after round, the order reversed every other round, so that the drift of a shared
machine hits every arm alike. A step's time is read off the train log (batch / samples per second), the first two
steps of every run left out; the figure is each arm's median over all rounds. The objectives' cost is the ratio of
`lightclip_no_distill` to `plain_clip` (#16's target: <= 1.20x) and of `lightclip_distill` to `distill_only`.

    python benchmarks/objective_cost.py [--steps 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_screens  # noqa: E402
from common import publish, train_step_times  # noqa: E402


ARMS = ("plain_clip", "lightclip_no_distill", "distill_only", "lightclip_distill")
PAIRS = {"objectives_over_clip": ("lightclip_no_distill", "plain_clip"),
         "objectives_over_distillation": ("lightclip_distill", "distill_only"),
         "distillation_over_clip": ("distill_only", "plain_clip")}


def step_times(arm: str, steps: int) -> list[float]:
    cfg = distill_screens.arm_config(arm, 0, (f"train.max_steps={steps}", "train.resume=false",
                                              "train.checkpoint_every=100000"))
    return train_step_times(cfg, distill_screens.TRAIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (distill_screens.TRAIN / "manifest.json").exists():
        sys.exit(f"no reinforced split at {distill_screens.TRAIN}: run `dvc repro reinforce` first")
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
            times[arm] += step_times(arm, args.steps)
        print(f"round {r}: " + ", ".join(f"{a} {statistics.median(t):.3f} s" for a, t in times.items()), flush=True)
    median = {arm: statistics.median(t) for arm, t in times.items()}
    ratios = {name: median[a] / median[b] for name, (a, b) in PAIRS.items()}
    publish("objective_cost", {"seconds": times, "median_s": median, "ratios": ratios,
                               "views": distill_screens.views_key()},
            measured=f"LightCLIP's objectives: {median['lightclip_no_distill']:.2f} s/step without distillation, "
                     f"{median['lightclip_distill']:.2f} s with it",
            reference=f"plain CLIP {median['plain_clip']:.2f} s, distillation alone {median['distill_only']:.2f} s",
            ratio=ratios["objectives_over_clip"],
            command=f"python benchmarks/objective_cost.py --steps {args.steps} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
