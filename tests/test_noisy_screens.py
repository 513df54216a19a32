"""benchmarks/noisy_screens.py: the noisy variant's split and runs are keyed by its data configuration (never mistaken
for the clean data's), and its section reports the objectives' difference to plain CLIP as scipy's Welch test does."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import distill_screens as ds  # noqa: E402
import noisy_screens as ns  # noqa: E402


def test_the_variant_trains_on_its_own_split_under_its_own_run_keys(tmp_path, monkeypatch) -> None:
    prepared = []
    monkeypatch.setattr(ns, "SCREENS", tmp_path / "screens")
    monkeypatch.setattr(ns, "prepare", lambda cfg, out: prepared.append((cfg.synthetic.noise_fraction, out)))
    noisy, other = ns.variant_split(0.3), ns.variant_split(0.5)
    assert noisy != other and [p[0] for p in prepared] == [0.3, 0.5]
    assert noisy.parent == tmp_path / "screens"

    manifest = tmp_path / "train" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"samples": 1}')
    cfg = ds.arm_config("plain_clip", 0, ns.variant_overrides(0.3))
    assert cfg.data.synthetic.noise_fraction == 0.3
    assert ds.run_key(cfg, manifest.parent) != ds.run_key(ds.arm_config("plain_clip", 0), manifest.parent)


def curve(scores: list[float]) -> list[dict]:
    return [{"step": 52 * (i + 1), "colour_shape": v / 100} for i, v in enumerate(scores)]


def run(end: float, scores: list[float]) -> dict:
    return {**{k: end / 100 for k in ds.METRICS}, "wall_time_s": 600.0, "curve": curve(scores)}


def test_the_section_reports_the_difference_and_welchs_standard_error() -> None:
    plain = {0: run(18.0, [10.0, 12.0, 15.0, 17.0, 18.0, 18.0]), 1: run(20.0, [9.0, 12.0, 14.0, 18.0, 19.0, 20.0])}
    objectives = {0: run(21.0, [11.0, 13.0, 16.0, 19.0, 20.0, 21.0]),
                  1: run(24.0, [10.0, 14.0, 17.0, 21.0, 23.0, 24.0])}
    runs = {"plain_clip": plain, "lightclip_no_distill": objectives}
    table = {arm: ds.compare(rows, plain) for arm, rows in runs.items()}
    text = ns.section(0.3, runs, table)
    welch = stats.ttest_ind([21.0, 24.0], [18.0, 20.0], equal_var=False)
    entry = table["lightclip_no_distill"]["colour_shape"]
    assert entry["diff"] / entry["welch_se"] == pytest.approx(welch.statistic)
    assert text.startswith(ns.TITLE) and "noise_fraction=0.3" in text
    assert f"end +3.5 points (paired by seed {entry['paired']})" in text
    # plain CLIP's ends are 18 / 20: on both seeds its checkpoint nearest half of that, among those up to the first
    # one at or above it, is step 52 (10 and 9), where the objectives have 11 and 10
    assert "at plain CLIP's half-way checkpoint +1.0" in text
