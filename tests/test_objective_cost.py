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
