"""Issue #16's distillation screens on the embedded default's reinforced split, each arm paired with the default by seed.

Every arm is the default recipe (`params.yaml`, what `dvc repro` trains) with its overrides, trained by the product's
own train -> export -> evaluate on `artifacts/reinforced/train` (the same stored views and the same data order for a
given seed) and scored on the test split. For each arm against `default`: the mean difference over the seeds both
have, its Welch standard error, and the paired differences; a difference counts when it exceeds twice its standard
error (issue #16's rule).

    python benchmarks/distill_screens.py [--arms default teacher_scale_50 ...] [--seeds 0 1 2] [--screen ...]
                                         [--curve] [--collect | --from-scratch]

Runs are sequential (on 2 cores two trainings at once each take 4x longer). A finished run is kept under `--work` as
`<arm>-seed<k>-<key>.json`, where the key hashes the resolved configuration and the reinforced manifest: a rerun
skips it, an arm that becomes the default reuses its runs, and a run of an older default is not mistaken for the
new one. Needs `dvc repro reinforce` first.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, config_key, publish, replace_section  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.evaluate.evaluation import evaluate  # noqa: E402
from lightclip_core.export.exporter import export  # noqa: E402
from lightclip_core.infra.storage import write_json_atomic  # noqa: E402
from lightclip_core.train.checkpoint import list_checkpoints  # noqa: E402
from lightclip_core.train.trainer import plan_steps, train  # noqa: E402

TRAIN = ROOT / "artifacts" / "reinforced" / "train"
TEST = ROOT / "artifacts" / "data" / "test"
VAL = ROOT / "artifacts" / "data" / "val"
LIGHTCLIP = ["objectives.contrastive.soft_targets=uniform", "objectives.token.enabled=true",
             "objectives.mlm.enabled=true"]  # LightCLIP's three objectives, as params.yaml sets them up
CLIP_LOSS = ["objectives.contrastive.soft_targets=none", "objectives.token.enabled=false",
             "objectives.mlm.enabled=false"]  # CLIP's plain targets, no token or MLM term
PLAIN_CLIP = [*CLIP_LOSS, "objectives.distill.enabled=false"]  # CLIP's loss alone
ARMS: dict[str, list[str]] = {  # overrides of params.yaml
    "default": [],
    "kd_only": ["objectives.distill.feature_weight=0"],
    "feature_weight_3": ["objectives.distill.feature_weight=3"],
    "no_contrastive": ["objectives.contrastive.enabled=false"],
    "teacher_scale_own": ["objectives.distill.teacher_scales=null"],  # the teacher's learned scale (15.1 here)
    "teacher_scale_50": ["objectives.distill.teacher_scales=[50]"],
    "teacher_scale_70": ["objectives.distill.teacher_scales=[70]"],
    "teacher_scale_100": ["objectives.distill.teacher_scales=[100]"],
    "lam_0.75": ["objectives.distill.lam=0.75"],
    "lam_0.5": ["objectives.distill.lam=0.5"],
    "lam_1": ["objectives.distill.lam=1.0"],
    # issue #16 item 1: both caption batches against either alone
    "real_captions": ["objectives.distill.caption_batches=real"],
    "synthetic_captions": ["objectives.distill.caption_batches=synthetic"],
    "both_captions": ["objectives.distill.caption_batches=both"],  # the default until 2026-12-07 (ninth session)
    # ... and item 1's synthetic-caption filter (data/caption_filter.py) on both batches, at the margin that leaves the
    # fewest wrong captions in the synthetic batch (benchmarks/caption_filter.py, 2026-12-07, fourteenth session)
    "both_captions_filtered": ["objectives.distill.caption_batches=both",
                               "objectives.distill.synthetic_filter_margin=0.1"],
    # issue #16's headline arms on the same stored views, spelled out so that each names the same run whatever the
    # default is: CLIP alone, LightCLIP's three objectives without and with distillation, distillation alone (the
    # default since the three seeds of 2026-12-07)
    "plain_clip": PLAIN_CLIP,
    "lightclip_no_distill": [*LIGHTCLIP, "objectives.distill.enabled=false"],
    "lightclip_distill": [*LIGHTCLIP, "objectives.distill.enabled=true"],  # the default until 2026-12-07
    "distill_only": [*CLIP_LOSS, "objectives.distill.enabled=true"],
    # issue #16's learning efficiency: plain CLIP's curve run to 3x the default's step budget (its own schedule; 2
    # epochs since issue #15 item 5's screen of 2026-12-07, 3 before: its kept runs on 13f05de1f609 ran 9)
    "plain_clip_3x": [*PLAIN_CLIP, "train.epochs=6.0"],
    # plain CLIP on the original images of the same split (no stored views, so no augmentation): what a user without
    # dataset reinforcement trains (added on 2026-12-07 after the noisy variant's plain CLIP learned shape on them)
    "plain_clip_original_images": [*PLAIN_CLIP, "train.stored_views=false"],
    # image towers that learn shape faster supervised (benchmarks/shape_learning.py's probes)
    "tower_mnv2": ["model.image.tower=mobilenetv2_100"],  # the default until RepViT-M0.9's three seeds
    "tower_effb0": ["model.image.tower=efficientnet_b0"],
    "tower_mnv3": ["model.image.tower=mobilenetv3_large_100"],
    "tower_repvit_m0_9": ["model.image.tower=repvit_m0_9"],  # the default since: its runs are the default's
    "tower_resnet18": ["model.image.tower=resnet18"],
    # issue #15 item 5: the training's length and learning rate (2 epochs at lr 0.002 is the default since its screen
    # of 2026-12-07; 3 epochs at lr 0.001 before it)
    "epochs_2": ["train.epochs=2.0"],
    "epochs_1.5": ["train.epochs=1.5"],
    "epochs_3_lr_0.001": ["train.epochs=3.0", "train.lr=0.001"],  # the default until 2026-12-07 (tenth session)
    "epochs_6": ["train.epochs=6.0"],
}
METRICS = {"colour": "zeroshot/colour/top1", "shape": "zeroshot/shape/top1",
           "colour_shape": "zeroshot/colour_shape/top1",
           "i2t_R@1": "retrieval/image_to_text/R@1", "t2i_R@1": "retrieval/text_to_image/R@1",
           "attr_i2t_R@1": "retrieval_attribute/image_to_text/R@1",
           "attr_t2i_R@1": "retrieval_attribute/text_to_image/R@1"}
LABELS = {"colour": "colour", "shape": "shape", "colour_shape": "colour+shape", "i2t_R@1": "strict i2t R@1",
          "t2i_R@1": "strict t2i R@1", "attr_i2t_R@1": "attribute i2t R@1", "attr_t2i_R@1": "attribute t2i R@1"}
CURVE_POINTS = 6  # issue #16: every arm is evaluated on the test split every sixth of training
# The distillation loss's form, part of a distilled run's key: since issue #16's one instance-level term (2026-12-07)
# the contrastive section is CLIP's part of (1 - lam) * CLIP + lam * KD, no longer a separate term beside it, so the
# same configuration trains another loss. Runs without distillation train what they did and keep their keys.
FORMULATION = b"one instance-level term"
LONG_ARMS = ("plain_clip_3x",)  # arms run to a multiple of the default's budget: their curve has other steps


def views_key() -> str:
    """The stored views the runs train on (the reinforced manifest): each views key has its own section."""
    return hashlib.sha256((TRAIN / "manifest.json").read_bytes()).hexdigest()[:12]


def title() -> str:
    return (f"## Distillation screens on stored views {views_key()}, one instance-level term, paired by seed "
            f"(benchmarks/distill_screens.py)")


def arm_config(arm: str, seed: int, extra: tuple[str, ...] = ()):
    return load_config(ROOT / "params.yaml", [*ARMS[arm], f"train.seed={seed}", "tracking.enabled=false",
                                              "export.onnx=false", *extra])


def curve_overrides(cfg, train_dir: Path | None = None) -> tuple[str, ...]:
    """A step checkpoint every sixth of training, all kept (the trainer leaves checkpointing out of what decides a
    run's outcome, so the run is the same as without)."""
    total = plan_steps(cfg, json.loads(((train_dir or TRAIN) / "manifest.json").read_text())["num_samples"])[1]
    return f"train.checkpoint_every={math.ceil(total / CURVE_POINTS)}", f"train.keep_checkpoints={CURVE_POINTS}"


def run_key(cfg, train_dir: Path | None = None) -> str:
    """What decides a run's outcome: the resolved configuration, the stored views (or split) it trains on and, when
    it distils, the loss's form (FORMULATION)."""
    return config_key(cfg, ((train_dir or TRAIN) / "manifest.json").read_bytes(),
                      *((FORMULATION,) if cfg.objectives.distill.enabled else ()))


def kept_run(work: Path, seed: int, key: str) -> Path | None:
    """A finished run with this configuration and seed, under any arm's name."""
    return next(iter(sorted(work.glob(f"*-seed{seed}-{key}.json"))), None)


def metric_row(scores: dict[str, float], prefix: str = "") -> dict[str, float]:
    """METRICS out of an evaluation's metrics, under their short names (with `prefix`)."""
    return {prefix + key: scores[name] for key, name in METRICS.items()}


def test_scores(cfg, checkpoint: Path, out: Path) -> dict[str, float]:
    exported = export(cfg, checkpoint, out / "export").out_dir
    return metric_row(evaluate(cfg, exported, TEST, out / "eval").metrics)


def train_export_evaluate(cfg, out: Path, keep_log: Path, train_dir: Path | None = None) -> dict:
    """The product's train -> export on the reinforced split (or `train_dir`), then evaluate on the test split
    (METRICS) and on the validation split (the same, prefixed `val_`: where choices are made); training's log is
    kept at `keep_log`.
    `curve`: the test metrics at each step checkpoint, then at the end."""
    result = train(cfg, train_dir or TRAIN, out / "train")
    shutil.copyfile(result.train_log, keep_log)
    exported = export(cfg, result.final_checkpoint, out / "export").out_dir
    row = {"wall_time_s": result.metrics["wall_time_s"]}
    for prefix, split in (("", TEST), ("val_", VAL)):
        row.update(metric_row(evaluate(cfg, exported, split, out / f"eval-{split.name}",
                                       train_log=result.train_log).metrics, prefix))
    row["curve"] = [{"step": int(ckpt.stem.split("-")[1]), **test_scores(cfg, ckpt, out / ckpt.stem)}
                    for ckpt in list_checkpoints(out / "train" / "checkpoints")]
    row["curve"].append({"step": int(result.metrics["steps"]), **{key: row[key] for key in METRICS}})
    return row


def run_arm(arm: str, seed: int, work: Path, curve: bool, from_scratch: bool = False, train_dir: Path | None = None,
            extra: tuple[str, ...] = ()) -> dict[str, float]:
    """The arm's kept run, else a new one; `curve`: a kept run without a learning curve is run again for it;
    `from_scratch`: every kept run is run again. A rerun's end metrics are checked against the kept ones (the
    largest difference is recorded). `train_dir` and `extra` (overrides after the arm's): another training split
    and the configuration it was prepared with (benchmarks/noisy_screens.py)."""
    cfg = arm_config(arm, seed, extra)
    key = run_key(cfg, train_dir)
    kept = kept_run(work, seed, key)
    old = json.loads(kept.read_text()) if kept is not None else None
    if old is not None and not from_scratch and (not curve or "curve" in old):
        return old
    stem = kept.parent / kept.name.removesuffix(".json") if kept is not None else work / f"{arm}-seed{seed}-{key}"
    with tempfile.TemporaryDirectory() as tmp:
        row = train_export_evaluate(arm_config(arm, seed, (*extra, *curve_overrides(cfg, train_dir))), Path(tmp),
                                    stem.parent / f"{stem.name}.csv", train_dir)
    if old is not None:
        row["rerun_max_abs_diff"] = max(abs(row[k] - old[k]) for k in METRICS)
        print(f"rerun of {stem.name}: end metrics differ from the kept run by at most "
              f"{100 * row['rerun_max_abs_diff']:.2f} points", flush=True)
        if not from_scratch:  # the kept run gains its curve
            row = {**old, **{k: v for k, v in row.items() if k in ("curve", "rerun_max_abs_diff")}}
    row.update(arm=old["arm"] if old else arm, seed=seed, overrides=[*ARMS[arm], *extra])
    write_json_atomic(stem.parent / f"{stem.name}.json", row)  # not with_suffix: arm names hold dots (lam_0.5)
    print(f"done {arm} seed {seed}: " + ", ".join(f"{k} {100 * row[k]:.1f}" for k in METRICS), flush=True)
    return row


def compare(arm_rows: dict[int, dict], ref_rows: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Per metric, in points: each side's mean and sd over its seeds, the mean difference, its Welch standard error
    and the paired differences over the seeds both have."""
    out = {}
    for key in METRICS:
        a = [100 * r[key] for r in arm_rows.values()]
        b = [100 * r[key] for r in ref_rows.values()]
        diff, se = welch(a, b)
        entry = {"mean": statistics.fmean(a), "sd": statistics.stdev(a) if len(a) > 1 else 0.0, "diff": diff,
                 "paired": [round(100 * (arm_rows[s][key] - ref_rows[s][key]), 2)
                            for s in sorted(arm_rows) if s in ref_rows]}
        if se is not None:
            entry["welch_se"] = se
        out[key] = entry
    return out


def welch(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """The difference of the means and its Welch standard error (None unless both sides have two values)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, None
    return diff, math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def halfway_step(reference_curve: list[dict]) -> int:
    """Issue #16's second headline point, declared before the runs: the checkpoint where plain CLIP's colour+shape
    is nearest half of its end score (so that a gain is not hidden by saturation). Mended after plain CLIP's seed 1:
    the nearest among the checkpoints up to the first one at or above that half, so that on a curve that is flat
    from its first checkpoint (plain CLIP learns colour at once and never shape) it is the first checkpoint, not
    whichever later one noise put lowest."""
    half = reference_curve[-1]["colour_shape"] / 2
    inner = reference_curve[:-1]
    reached = next((i for i, p in enumerate(inner) if p["colour_shape"] >= half), len(inner) - 1)
    return min(inner[:reached + 1], key=lambda p: (abs(p["colour_shape"] - half), p["step"]))["step"]


def steps_to_reach(curve: list[dict], key: str, target: float) -> int | None:
    """The first evaluated step whose `key` is at least `target`; None when the curve never gets there (then the
    steps needed are more than its last step: a lower bound)."""
    return next((p["step"] for p in curve if p[key] >= target), None)


def curve_lines(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Colour+shape on the test split at every sixth of training, per arm (mean over its seeds with a curve), and
    the half-way point read off plain CLIP's curve."""
    curves = {arm: [r["curve"] for r in rows.values() if "curve" in r] for arm, rows in runs.items()
              if arm not in LONG_ARMS}
    curves = {arm: c for arm, c in curves.items() if c}
    if not curves:
        return []
    steps = [p["step"] for p in next(iter(curves.values()))[0]]
    lines = ["", "Colour+shape (test) during training, mean over the seeds with a curve (`--curve`):", "",
             "| arm | seeds | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for arm, cs in curves.items():
        means = [100 * statistics.fmean(c[i]["colour_shape"] for c in cs) for i in range(len(steps))]
        lines.append(f"| {arm} | {len(cs)} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    if "plain_clip" in curves:
        plain = {seed: r["curve"] for seed, r in runs["plain_clip"].items() if "curve" in r}
        notes = []
        for seed, curve in plain.items():
            half = halfway_step(curve)
            pairs = [f"{arm} {100 * (point['colour_shape'] - ref['colour_shape']):+.1f}"
                     for arm, rows in runs.items()
                     if arm not in ("plain_clip", *LONG_ARMS) and "curve" in rows.get(seed, {})
                     for point, ref in zip(rows[seed]["curve"], curve) if point["step"] == half]
            at_half = next(p["colour_shape"] for p in curve if p["step"] == half)
            notes.append(f"seed {seed}: step {half} (plain CLIP {100 * at_half:.1f}%): "
                         + (", ".join(pairs) or "no other curve"))
        lines += ["", "Half-way point (plain CLIP nearest half its end score) and each arm's colour+shape minus plain "
                      "CLIP's there, by seed: " + "; ".join(notes) + "."]
        lines += efficiency_lines(runs, plain)
    return lines


def efficiency_lines(runs: dict[str, dict[int, dict]], plain: dict[int, list[dict]]) -> list[str]:
    """Issue #16's learning efficiency per distilled run: the steps plain CLIP needs to reach the run's end
    colour+shape over the run's steps, read off plain CLIP's curve run to 3x the budget (`plain_clip_3x`) where the
    seed has one, else off its curve at the budget; a curve that never gets there gives a lower bound. And the other
    way round: the step by which the run passes plain CLIP's end score."""
    long = {seed: r["curve"] for seed, r in runs.get("plain_clip_3x", {}).items() if "curve" in r}
    reach, bounds = [], []
    for arm, rows in runs.items():
        if not arm_config(arm, 0).objectives.distill.enabled:  # the efficiency is distillation's
            continue
        for seed, r in rows.items():
            if seed not in plain or "curve" not in r:
                continue
            budget = r["curve"][-1]["step"]
            reference = long.get(seed, plain[seed])
            needed = steps_to_reach(reference, "colour_shape", r["colour_shape"])
            ratio = needed / budget if needed else reference[-1]["step"] / budget
            bounds.append((ratio, needed is None))
            ahead = steps_to_reach(r["curve"], "colour_shape", plain[seed][-1]["colour_shape"])
            reach.append(f"{arm} seed {seed}: " + (f"{ratio:.2f}x (plain CLIP reaches it at step {needed})" if needed
                                                   else f"> {ratio:.0f}x (plain CLIP's curve to step "
                                                        f"{reference[-1]['step']} never reaches it)")
                         + (f"; it passes plain CLIP's end score by step {ahead}" if ahead else ""))
    if not reach:
        return []
    least, bound = min(bounds)
    verdict = ("Item 1's learning efficiency (>= 2x): "
               + (f"holds on every run (at least {least:.1f}x)" if least >= 2 else
                  f"not shown (a lower bound of {least:.1f}x: plain CLIP's curve is too short)" if bound else
                  f"missed ({least:.2f}x)"))
    return ["", "Learning efficiency, the steps plain CLIP needs to reach the run's end colour+shape over the run's "
                "steps, read off plain CLIP's curve run to 3x the budget (`plain_clip_3x`, its own schedule) where the "
                "seed has one, else off its curve at the budget (a curve that never gets there gives a lower bound): "
            + "; ".join(reach) + f". {verdict}."]


# issue #16's verdicts, their thresholds declared before the three-seed runs (a922940; the arms renamed since for the
# new default): (arm, reference, what it tests, where it is read, the least colour+shape gain in points, the baseline
# whose curve gives each seed's half-way step); a gain holds when it is at least that and more than twice its Welch
# SE. The last row (declared in the thirteenth session) reads item 1 against training without reinforcement, beside
# the protocol's baseline on the same stored views.
HEADLINE = (("distill_only", "plain_clip", "item 1: distillation over plain CLIP", "half-way", 3.0, "plain_clip"),
            ("lightclip_no_distill", "plain_clip", "item 2: LightCLIP's objectives over plain CLIP", "end", 2.0,
             "plain_clip"),
            ("lightclip_distill", "distill_only", "item 3: the objectives on top of distillation", "end", 0.0,
             "plain_clip"),
            ("lightclip_distill", "plain_clip", "item 3: both over plain CLIP", "half-way", 3.0, "plain_clip"),
            ("distill_only", "plain_clip_original_images",
             "item 1 against plain CLIP on the original images (no reinforcement)", "half-way", 3.0,
             "plain_clip_original_images"))


def halfway_scores(runs: dict[str, dict[int, dict]], arm: str, baseline: str = "plain_clip") -> list[float]:
    """The arm's colour+shape (points) at each seed's half-way step read off `baseline`'s curve, for the seeds where
    both have a curve."""
    base = {seed: r["curve"] for seed, r in runs.get(baseline, {}).items() if "curve" in r}
    return [100 * next(p["colour_shape"] for p in r["curve"] if p["step"] == halfway_step(base[seed]))
            for seed, r in runs.get(arm, {}).items() if seed in base and "curve" in r]


def difference(d: tuple[float, float | None] | None) -> str:
    """A difference and how many Welch standard errors it is, as the table's cells show it."""
    return "-" if d is None else f"{d[0]:+.1f}" + ("" if not d[1] else f" ({abs(d[0]) / d[1]:.1f} SE)")


def headline_lines(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Issue #16's headline comparisons (HEADLINE) on colour+shape, over the seeds each arm has: the difference at
    the half-way point and at the end, each with its Welch SE, and whether the item's gain holds."""
    lines = []
    for arm, ref, what, point, least, baseline in HEADLINE:
        if arm not in runs or ref not in runs:
            continue
        end = welch([100 * r["colour_shape"] for r in runs[arm].values()],
                    [100 * r["colour_shape"] for r in runs[ref].values()])
        arm_half, ref_half = halfway_scores(runs, arm, baseline), halfway_scores(runs, ref, baseline)
        half = welch(arm_half, ref_half) if arm_half and ref_half else None
        read = end if point == "end" else half
        if read is None or read[1] is None:
            verdict = "no verdict (one seed)"
        else:
            holds = read[0] >= least and read[0] > 2 * read[1]
            verdict = f"{'holds' if holds else 'missed'} (needs >= {least:g} points and > 2 SE at the {point})"
            if point == "half-way" and end[1] is not None and end[0] < -2 * end[1]:
                verdict += ", but worse at the end"
        lines.append(f"| {what} | {arm} - {ref} | {len(runs[arm])} / {len(runs[ref])} | {difference(half)} | "
                     f"{difference(end)} | {verdict} |")
    if not lines:
        return []
    return ["", "Issue #16's verdicts on colour+shape (test), differences in points with their Welch SE, the half-way "
                "step read off each seed's plain CLIP curve (the last row's: off plain CLIP's on the original "
                "images):", "",
            "| what | arms | seeds | half-way | end | verdict |", "|---|---|---|---|---|---|", *lines]


def cell(entry: dict[str, float], reference: bool) -> str:
    text = f"{entry['mean']:.1f} ± {entry['sd']:.1f}"
    if reference:
        return text
    se = entry.get("welch_se")
    significant = se is not None and se > 0 and abs(entry["diff"]) > 2 * se
    diff = f"{entry['diff']:+.1f}" + (f" ({abs(entry['diff']) / se:.1f} SE)" if se else "")
    return f"{text}, {'**' + diff + '**' if significant else diff}"


def default_aliases(runs: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """The default's runs under the name of each HEADLINE arm that is the default (the same resolved configuration:
    `distill_only` since 2026-12-07), for the verdicts."""
    default = arm_config("default", 0).model_dump()
    return {arm: runs["default"] for arm in {a for row in HEADLINE for a in row[:2]}
            if arm not in runs and arm_config(arm, 0).model_dump() == default}


def write_section(runs: dict[str, dict[int, dict]], table: dict[str, dict], seeds: list[int],
                  headline_runs: dict[str, dict[int, dict]]) -> None:
    """The section of these stored views; `headline_runs`: `runs` with the default also under its HEADLINE names."""
    keys = list(METRICS)
    lines = [title(), "",
             "The default recipe (`params.yaml`) against one change at a time, on the stored views in "
             "`artifacts/reinforced/train` when the runs were made (their key is in each kept run's file name: views "
             f"differ between machines), test split, seeds {', '.join(map(str, seeds))} (the same views and data "
             "order per seed; validation figures are in the JSON, prefixed `val_`). Each cell: "
             "mean ± sd over the arm's seeds in points, then the difference to `default` (bold where it exceeds "
             "twice its Welch standard error, issue #16's rule; one seed has no standard error: a screen, not a "
             "result). Train wall time: mean seconds, separate runs.", "",
             "| arm | overrides | seeds | " + " | ".join(LABELS[k] for k in keys) + " | train wall |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for arm, rows in runs.items():
        overrides = ", ".join(f"`{o}`" for o in ARMS[arm]) or "(params.yaml)"
        wall = statistics.fmean(r["wall_time_s"] for r in rows.values())
        cells = [cell(table[arm][k], arm == "default") for k in keys]
        lines.append(f"| {arm} | {overrides} | {len(rows)} | " + " | ".join(cells) + f" | {wall:.0f} s |")
    lines += ["", "Paired differences to `default` by seed, colour+shape: " + "; ".join(
        f"{arm} {table[arm]['colour_shape']['paired']}" for arm in runs if arm != "default") + "."]
    lines += curve_lines(runs) + headline_lines(headline_runs)
    replace_section("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["default", "teacher_scale_50"], choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--screen", nargs="+", default=[], choices=list(ARMS),
                        help="arms run on the first seed only (one-seed screens)")
    parser.add_argument("--collect", action="store_true", help="publish the kept runs without training more")
    parser.add_argument("--curve", action="store_true",
                        help="run kept runs without a learning curve again for it (checked against the kept end)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train every run again, kept or not (each checked against its kept end metrics)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "distill-runs")
    args = parser.parse_args()
    if not all((split / "manifest.json").exists() for split in (TRAIN, VAL, TEST)):
        sys.exit(f"no reinforced split at {TRAIN}, or no {VAL} or {TEST}: run `dvc repro reinforce` first")
    args.work.mkdir(parents=True, exist_ok=True)
    plan = {arm: list(args.seeds) for arm in dict.fromkeys(["default", *args.arms])}
    for arm in args.screen:  # collecting, a screen's kept run counts on whichever seed it was run
        plan.setdefault(arm, list(args.seeds) if args.collect else args.seeds[:1])
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:  # seed-major: an interrupted run still covers every arm
        for arm, seeds in plan.items():
            if seed not in seeds:
                continue
            if args.collect:
                kept = kept_run(args.work, seed, run_key(arm_config(arm, seed)))
                if kept is None:
                    continue
                runs.setdefault(arm, {})[seed] = json.loads(kept.read_text())
            else:
                runs.setdefault(arm, {})[seed] = run_arm(arm, seed, args.work, args.curve, args.from_scratch)
    if "default" not in runs:
        sys.exit("no kept run of the default: nothing to compare with")
    table = {arm: compare(rows, runs["default"]) for arm, rows in runs.items()}
    write_section(runs, table, args.seeds, {**default_aliases(runs), **runs})
    best = max(runs, key=lambda arm: table[arm]["colour_shape"]["mean"])
    ref = table["default"]["colour_shape"]["mean"]
    command = ("python benchmarks/distill_screens.py --arms " + " ".join(plan) + " --seeds "
               + " ".join(map(str, args.seeds)) + (" --screen " + " ".join(args.screen) if args.screen else ""))
    kept = {a: {str(s): r for s, r in rows.items()} for a, rows in runs.items()}
    publish(f"distill_screens_{views_key()}_one_term", {"seeds": args.seeds, "runs": kept, "table": table},
            measured=f"best arm {best}: colour+shape {table[best]['colour_shape']['mean']:.1f}%",
            reference=f"default: colour+shape {ref:.1f}%", ratio=table[best]["colour_shape"]["mean"] / ref,
            command=command)


if __name__ == "__main__":
    main()
