"""benchmarks/distill_screens.py: the significance it reports is scipy's Welch test, and a kept run is found by what
decides its outcome (the resolved configuration and the stored views), whatever arm it was run under."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import distill_screens as ds  # noqa: E402


def rows(values: dict[int, float]) -> dict[int, dict[str, float]]:
    return {seed: {key: v / 100 for key in ds.METRICS} for seed, v in values.items()}


def test_the_difference_and_its_standard_error_are_welchs() -> None:
    arm, ref = {0: 40.4, 1: 30.0, 2: 33.1}, {0: 35.6, 1: 26.1, 2: 31.4}
    entry = ds.compare(rows(arm), rows(ref))["shape"]
    welch = stats.ttest_ind(list(arm.values()), list(ref.values()), equal_var=False)
    assert entry["diff"] == pytest.approx(sum(arm.values()) / 3 - sum(ref.values()) / 3)
    assert entry["diff"] / entry["welch_se"] == pytest.approx(welch.statistic)
    assert entry["paired"] == pytest.approx([4.8, 3.9, 1.7])


def test_one_seed_has_no_standard_error_and_pairs_only_shared_seeds() -> None:
    entry = ds.compare(rows({0: 40.0}), rows({0: 35.0, 1: 30.0, 2: 31.0}))["colour"]
    assert "welch_se" not in entry and entry["paired"] == [5.0]
    assert "SE" not in ds.cell(entry, reference=False)


@pytest.fixture()
def reinforced(tmp_path, monkeypatch) -> Path:
    manifest = tmp_path / "reinforced" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"samples": 1}')
    monkeypatch.setattr(ds, "TRAIN", manifest.parent)
    return manifest


def test_the_run_key_follows_the_configuration_and_the_stored_views(reinforced) -> None:
    default = ds.run_key(ds.arm_config("default", 0))
    assert ds.run_key(ds.arm_config("default", 0)) == default
    assert ds.run_key(ds.arm_config("default", 1)) != default
    assert ds.run_key(ds.arm_config("kd_only", 0)) != default
    reinforced.write_text('{"samples": 2}')
    assert ds.run_key(ds.arm_config("default", 0)) != default


def test_a_kept_run_is_found_under_any_arm_name(reinforced, tmp_path) -> None:
    key = ds.run_key(ds.arm_config("teacher_scale_50", 1))
    (tmp_path / f"teacher_scale_50-seed1-{key}.json").write_text("{}")
    assert ds.kept_run(tmp_path, 1, key) is not None
    assert ds.kept_run(tmp_path, 0, key) is None
    assert ds.kept_run(tmp_path, 1, ds.run_key(ds.arm_config("default", 1))) is None
