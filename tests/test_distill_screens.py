"""benchmarks/distill_screens.py: the significance it reports is scipy's Welch test, and a kept run is found by what
decides its outcome (the resolved configuration and the stored views), whatever arm it was run under."""
from __future__ import annotations

import json
import math
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
    # a distilled run's key names the loss's form (the one instance-level term since 2026-12-07); one without
    # distillation trains what it did and keeps its key
    views = reinforced.read_bytes()
    assert default != ds.config_key(ds.arm_config("default", 0), views)
    plain = ds.arm_config("plain_clip", 0)
    assert ds.run_key(plain) == ds.config_key(plain, views)
    reinforced.write_text('{"samples": 2}')
    assert ds.run_key(ds.arm_config("default", 0)) != default


def test_a_field_added_at_its_neutral_value_leaves_the_keys_of_kept_runs_as_they_were(reinforced) -> None:
    """The synthetic-caption filter (off) is left out of the key: the key is that of the configuration without the
    field, as runs kept before it existed were keyed; the filter on is another key."""
    import hashlib

    cfg = ds.arm_config("both_captions", 0)
    dump = cfg.model_dump(mode="json")
    assert dump["objectives"]["distill"].pop("synthetic_filter_margin") is None
    views = reinforced.read_bytes()
    before = hashlib.sha256(json.dumps(dump, sort_keys=True).encode())
    before.update(views)
    assert ds.config_key(cfg, views) == before.hexdigest()[:12]
    filtered = ds.arm_config("both_captions", 0, ("objectives.distill.synthetic_filter_margin=0.0",))
    assert ds.config_key(filtered, views) != ds.config_key(cfg, views)


def test_a_kept_run_is_found_under_any_arm_name(reinforced, tmp_path) -> None:
    key = ds.run_key(ds.arm_config("teacher_scale_50", 1))
    (tmp_path / f"teacher_scale_50-seed1-{key}.json").write_text("{}")
    assert ds.kept_run(tmp_path, 1, key) is not None
    assert ds.kept_run(tmp_path, 0, key) is None
    assert ds.kept_run(tmp_path, 1, ds.run_key(ds.arm_config("default", 1))) is None


def test_the_learning_curve_leaves_the_run_as_it_is(reinforced) -> None:
    """The curve's checkpoints change nothing the trainer counts as deciding the run (its resume fingerprint)."""
    from lightclip_core.train.trainer import train_fingerprint
    reinforced.write_text('{"num_samples": 20000, "shards": [{"url": "s.tar", "num_samples": 20000}]}')
    plain = ds.arm_config("default", 0)
    curved = ds.arm_config("default", 0, ds.curve_overrides(plain))
    manifest = {"shards": [{"url": "s.tar", "num_samples": 20000}]}
    assert train_fingerprint(curved, manifest, 1) == train_fingerprint(plain, manifest, 1)
    every = curved.train.checkpoint_every
    steps = math.ceil(plain.train.epochs * (20000 // plain.train.batch_size))  # the default's budget: full batches
    assert every * (ds.CURVE_POINTS - 1) < steps <= every * ds.CURVE_POINTS
    assert curved.train.keep_checkpoints >= ds.CURVE_POINTS - 1


def test_each_set_of_stored_views_has_its_own_section(reinforced) -> None:
    first = ds.title()
    reinforced.write_text('{"samples": 2}')
    assert ds.title() != first and ds.views_key() in ds.title()


def curve(scores: list[float]) -> list[dict]:
    return [{"step": 78 * (i + 1), "colour_shape": v / 100} for i, v in enumerate(scores)]


def test_the_half_way_point_is_where_plain_clip_is_nearest_half_its_end() -> None:
    scores = [2.0, 6.0, 9.5, 13.0, 18.0, 22.0]
    brute = min(range(5), key=lambda i: abs(scores[i] - scores[-1] / 2))
    assert ds.halfway_step(curve(scores)) == 78 * (brute + 1) == 234



def test_on_a_flat_curve_the_half_way_point_is_the_first_checkpoint() -> None:
    """Plain CLIP learns colour by its first checkpoint and never shape: every checkpoint is above half its end, and
    the lowest (step 234 here) is noise, not a half-way point."""
    assert ds.halfway_step(curve([21.1, 21.0, 20.2, 22.0, 21.0, 20.3])) == 78
    assert ds.halfway_step(curve([1.0, 1.5, 2.0, 2.5, 3.0, 40.0])) == 390  # never half before the end: the last one

def test_steps_to_reach_is_the_first_step_at_or_above_the_target() -> None:
    c = curve([10.0, 40.0, 70.0, 90.0, 96.0, 97.0])
    assert ds.steps_to_reach(c, "colour_shape", 0.70) == 234
    assert ds.steps_to_reach(c, "colour_shape", 0.965) == 468
    assert ds.steps_to_reach(c, "colour_shape", 0.98) is None


def test_the_curve_section_reads_the_half_way_point_and_both_efficiencies_off_the_curves() -> None:
    arm, plain = curve([40.0, 65.0, 83.0, 93.0, 95.7, 96.5]), curve([12.0, 18.0, 22.0, 23.7, 22.8, 22.3])
    runs = {"default": {0: {"curve": arm, "colour_shape": 0.965}},
            "plain_clip": {0: {"curve": plain, "colour_shape": 0.223}}}
    text = "\n".join(ds.curve_lines(runs))
    assert "step 78 (plain CLIP 12.0%): default +28.0" in text  # 11.15% is half the end: step 78 is nearest
    assert "default seed 0: > 1x (plain CLIP's curve to step 468 never reaches it); it passes plain CLIP's end " \
           "score by step 78" in text
    assert "not shown (a lower bound of 1.0x" in text


def test_the_learning_efficiency_is_read_off_plain_clips_curve_to_three_times_the_budget() -> None:
    """With `plain_clip_3x` (checkpoints every 234 steps to 1404), the steps it needs over the run's 468; a curve
    that never gets there is a lower bound of 3x, which meets issue #16's 2x."""
    arm, plain = curve([40.0, 65.0, 83.0, 93.0, 95.7, 96.5]), curve([12.0, 18.0, 22.0, 23.7, 22.8, 22.3])
    long = [{"step": 234 * (i + 1), "colour_shape": v / 100} for i, v in enumerate([20, 30, 50, 70, 90, 97])]
    runs = {"default": {0: {"curve": arm, "colour_shape": 0.965}},
            "plain_clip": {0: {"curve": plain, "colour_shape": 0.223}},
            "plain_clip_3x": {0: {"curve": long, "colour_shape": 0.97}}}
    text = "\n".join(ds.curve_lines(runs))
    assert "default seed 0: 3.00x (plain CLIP reaches it at step 1404)" in text
    assert "holds on every run (at least 3.0x)" in text
    assert "| plain_clip_3x |" not in text  # its curve has other steps than the table's
    runs["plain_clip_3x"][0]["curve"][-1]["colour_shape"] = 0.90
    text = "\n".join(ds.curve_lines(runs))
    assert "> 3x (plain CLIP's curve to step 1404 never reaches it)" in text and "at least 3.0x" in text
    runs["plain_clip_3x"][0]["curve"][1]["colour_shape"] = 0.97
    assert "missed (1.00x)" in "\n".join(ds.curve_lines(runs))


def headline_rows(ends: dict[str, list[float]]) -> dict[str, str]:
    """The verdict rows for arms whose curves share plain CLIP's shape but start and end at the given scores."""
    runs = {arm: {s: {"curve": curve([first, 18.0, 22.0, 23.7, 22.8, end]), "colour_shape": end / 100}
                  for s, (first, end) in enumerate(scores)} for arm, scores in ends.items()}
    return {line.split(" | ")[1]: line for line in ds.headline_lines(runs) if line.startswith("| item")}


def test_the_headline_verdicts_apply_issue_16s_thresholds_to_welchs_test() -> None:
    """Item 1 (distillation) needs >= 3 points and > 2 SE at plain CLIP's half-way step, item 2 (the objectives)
    >= 2 points and > 2 SE at the end; the SE is scipy's Welch."""
    plain = [(12.0, 22.0), (13.0, 23.0), (14.0, 24.0)]
    rows = headline_rows({"plain_clip": plain, "distill_only": [(40.0, 96.0), (42.0, 97.0), (44.0, 98.0)],
                          "lightclip_no_distill": [(12.0, 23.0), (12.0, 25.5), (12.0, 28.0)]})
    half = stats.ttest_ind([40.0, 42.0, 44.0], [12.0, 13.0, 14.0], equal_var=False)
    assert f"| +29.0 ({half.statistic:.1f} SE) |" in rows["distill_only - plain_clip"]
    assert "| holds" in rows["distill_only - plain_clip"]
    end = stats.ttest_ind([23.0, 25.5, 28.0], [22.0, 23.0, 24.0], equal_var=False)
    assert end.statistic < 2  # 2.5 points, but not twice its standard error
    assert f"| +2.5 ({end.statistic:.1f} SE) | missed" in rows["lightclip_no_distill - plain_clip"]
    assert len(rows) == 2  # the combined arm's rows need its runs
    steady = headline_rows({"plain_clip": plain, "lightclip_no_distill": [(12.0, 24.5), (12.0, 25.0), (12.0, 25.5)]})
    assert "| holds" in steady["lightclip_no_distill - plain_clip"]
    small = headline_rows({"plain_clip": plain, "lightclip_no_distill": [(12.0, 24.4), (12.0, 24.5), (12.0, 24.6)]})
    assert "| missed" in small["lightclip_no_distill - plain_clip"]  # 1.5 points: many SE, under 2 points


def test_item_1_against_the_original_images_reads_the_half_way_step_off_that_baselines_own_curve() -> None:
    """The row beside the protocol's: distillation minus plain CLIP on the original images, at the checkpoint where
    that baseline (not plain CLIP on the stored views) is nearest half its end, per seed."""
    original = [[30.0, 56.0, 74.0, 89.0, 95.0, 95.0], [20.0, 40.0, 49.0, 80.0, 93.0, 96.0],
                [25.0, 50.0, 70.0, 88.0, 94.0, 94.0]]
    distill = [[34.0, 56.0, 84.0, 92.0, 96.0, 97.0], [30.0, 50.0, 70.0, 90.0, 97.0, 98.0],
               [35.0, 60.0, 85.0, 93.0, 96.0, 97.0]]
    runs = {"plain_clip": {s: {"curve": curve([12.0, 18.0, 22.0, 23.7, 22.8, 20.0]), "colour_shape": 0.2}
                           for s in range(3)},
            "plain_clip_original_images": {s: {"curve": curve(c), "colour_shape": c[-1] / 100}
                                           for s, c in enumerate(original)},
            "distill_only": {s: {"curve": curve(c), "colour_shape": c[-1] / 100} for s, c in enumerate(distill)}}
    # brute force: each seed's checkpoint nearest half the baseline's end, among those up to the first at or above it
    half_index = [1, 2, 1]
    for c, i in zip(original, half_index):
        assert all(abs(c[i] - c[-1] / 2) <= abs(c[j] - c[-1] / 2) for j in range(i + 1))
    gains = [d[i] for d, i in zip(distill, half_index)], [o[i] for o, i in zip(original, half_index)]
    half = stats.ttest_ind(*gains, equal_var=False)
    row = next(line for line in ds.headline_lines(runs) if "plain_clip_original_images" in line)
    diff = sum(gains[0]) / 3 - sum(gains[1]) / 3
    assert f"| {diff:+.1f} ({half.statistic:.1f} SE) |" in row
    assert ("| holds" in row) == (diff >= 3 and half.statistic > 2)


def test_a_rewritten_section_keeps_its_neighbours_apart_and_rewriting_it_again_changes_nothing(tmp_path,
                                                                                               monkeypatch) -> None:
    import common
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nb\n")
    monkeypatch.setattr(common, "TABLE", table)
    common.replace_section("## A\n\nnew a\n")
    assert table.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb\n"
    common.replace_section("## A\n\nnew a\n")
    common.replace_section("## C\n\nc\n")
    assert table.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb\n\n## C\n\nc\n"



def test_the_verdicts_read_the_default_under_each_headline_name_whose_configuration_it_is() -> None:
    default = {0: {"colour_shape": 0.97}}
    aliases = ds.default_aliases({"default": default})
    same = {arm for row in ds.HEADLINE for arm in row[:2]
            if ds.arm_config(arm, 0).model_dump() == ds.arm_config("default", 0).model_dump()}
    assert set(aliases) == same and all(rows is default for rows in aliases.values())
    assert ds.default_aliases({"default": default, **{arm: {} for arm in same}}) == {}  # a run of its own wins
