"""benchmarks/pipeline_screens.py: every arm is a valid configuration that differs from the default only where it
says, and an arm that changes the data is the one that reruns `prepare`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import pipeline_screens as ps  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402



@pytest.mark.parametrize("arm", list(ps.ARMS))
def test_an_arm_changes_exactly_its_overrides(arm) -> None:
    default = load_config(ROOT / "params.yaml", ["tracking.enabled=false"]).flat()
    changed = ps.arm_config(arm).flat()
    differs = {k for k in default if default[k] != changed[k]}
    assert differs == {o.split("=")[0] for o in ps.ARMS[arm]}
    assert ps.run_key(ps.arm_config(arm)) != ps.run_key(load_config(ROOT / "params.yaml", ["tracking.enabled=false"]))


def test_the_section_lists_each_stage_and_the_total(monkeypatch) -> None:
    written = []
    monkeypatch.setattr(ps, "replace_section", written.append)
    row = {"seconds": {"teacher": 300.0, "reinforce": 100.0, "train": 600.0, "export": 20.0, "evaluate": 10.0},
           "teacher_colour_shape": 0.98, "teacher_shape": 0.99, "caption_shape": 0.97, "colour_shape": 0.95,
           "val_colour_shape": 0.96, "shape": 0.95, "val_shape": 0.96, "i2t_R@1": 0.34, "t2i_R@1": 0.23,
           "overrides": ["teacher.train.steps=150"]}
    committed = {**row, "seconds": {**row["seconds"], "prepare": 25.0}}
    ps.write_section({"committed run": committed, "teacher_steps_150": row})
    line = next(ln for ln in written[0].splitlines() if ln.startswith("| teacher_steps_150"))
    assert "| - | 300 | 100 | 600 | 20 | 10 | 1055 |" in line and "95.0% (96.0%)" in line
