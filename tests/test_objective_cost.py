"""benchmarks/objective_cost.py: each ratio it reports compares two arms that differ in exactly what it names."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import distill_screens  # noqa: E402
import objective_cost  # noqa: E402

OBJECTIVES = {"objectives.contrastive.soft_targets", "objectives.token.enabled", "objectives.mlm.enabled"}


def differing(a: str, b: str) -> set[str]:
    x, y = (distill_screens.arm_config(arm, 0).flat() for arm in (a, b))
    return {k for k in x if x[k] != y[k]}


@pytest.mark.parametrize("pair, expected", [("objectives_over_clip", OBJECTIVES),
                                            ("objectives_over_distillation", OBJECTIVES),
                                            ("distillation_over_clip", {"objectives.distill.enabled"})])
def test_a_ratio_compares_arms_that_differ_only_in_what_it_names(pair, expected) -> None:
    assert differing(*objective_cost.PAIRS[pair]) == expected


def test_the_paired_ratio_cancels_a_shared_drift_and_ignores_a_spike_on_one_arm() -> None:
    """Within a step both arms run at the machine's speed of the moment, which drifts 3x over the run; a transient
    spike hits one arm on one step and the other arm on another. The paired figure is the true 1.2."""
    speed = [1.0 + 2 * i / 9 for i in range(10)]
    arm = [1.2 * s for s in speed]
    ref = list(speed)
    arm[2] *= 3.0
    ref[7] *= 3.0
    assert objective_cost.paired_ratio(arm, ref) == pytest.approx(1.2)
    with pytest.raises(ValueError):  # steps are paired: both arms need the same steps
        objective_cost.paired_ratio(arm, ref[:-1])
