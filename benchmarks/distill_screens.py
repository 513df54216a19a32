"""Issue #16's distillation screens on the embedded default's reinforced split, each arm paired with the default by seed.

Every arm is the default recipe (`params.yaml`, what `dvc repro` trains) with its overrides, trained by the product's
own train -> export -> evaluate on `artifacts/reinforced/train` (the same stored views and the same data order for a
given seed) and scored on the test split. For each arm against `default`: the mean difference over the seeds both
have, its Welch standard error, and the paired differences; a difference counts when it exceeds twice its standard
error (issue #16's rule).

    python benchmarks/distill_screens.py [--arms default teacher_scale_50 ...] [--seeds 0 1 2] [--collect]

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
from common import ROOT, publish, replace_section  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.evaluate.evaluation import evaluate  # noqa: E402
from lightclip_core.export.exporter import export  # noqa: E402
from lightclip_core.infra.storage import write_json_atomic  # noqa: E402
from lightclip_core.train.trainer import train  # noqa: E402

TRAIN = ROOT / "artifacts" / "reinforced" / "train"
TEST = ROOT / "artifacts" / "data" / "test"
VAL = ROOT / "artifacts" / "data" / "val"
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
    # issue #16's reference arms on the same stored views: CLIP alone, and LightCLIP's objectives without distillation
    "plain_clip": ["objectives.contrastive.soft_targets=none", "objectives.token.enabled=false",
                   "objectives.mlm.enabled=false", "objectives.distill.enabled=false"],
    "lightclip_no_distill": ["objectives.distill.enabled=false"],
    # image towers that learn shape faster supervised (benchmarks/shape_learning.py's probes)
    "tower_mnv2": ["model.image.tower=mobilenetv2_100"],  # the default until RepViT-M0.9's three seeds
    "tower_effb0": ["model.image.tower=efficientnet_b0"],
    "tower_mnv3": ["model.image.tower=mobilenetv3_large_100"],
    "tower_repvit_m0_9": ["model.image.tower=repvit_m0_9"],  # the default since: its runs are the default's
    "tower_resnet18": ["model.image.tower=resnet18"],
    "epochs_2": ["train.epochs=2.0"],  # issue #15 item 5: a shorter training, if the student loses nothing
    "epochs_1.5": ["train.epochs=1.5"],
}
METRICS = {"colour": "zeroshot/colour/top1", "shape": "zeroshot/shape/top1",
           "colour_shape": "zeroshot/colour_shape/top1",
           "i2t_R@1": "retrieval/image_to_text/R@1", "t2i_R@1": "retrieval/text_to_image/R@1",
           "attr_i2t_R@1": "retrieval_attribute/image_to_text/R@1",
           "attr_t2i_R@1": "retrieval_attribute/text_to_image/R@1"}
LABELS = {"colour": "colour", "shape": "shape", "colour_shape": "colour+shape", "i2t_R@1": "strict i2t R@1",
          "t2i_R@1": "strict t2i R@1", "attr_i2t_R@1": "attribute i2t R@1", "attr_t2i_R@1": "attribute t2i R@1"}
TITLE = "## Distillation screens, paired by seed (benchmarks/distill_screens.py)"


def arm_config(arm: str, seed: int):
    return load_config(ROOT / "params.yaml", [*ARMS[arm], f"train.seed={seed}", "tracking.enabled=false",
                                              "export.onnx=false"])


def run_key(cfg) -> str:
    """What decides a run's outcome: the resolved configuration and the stored views it trains on."""
    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    digest.update((TRAIN / "manifest.json").read_bytes())
    return digest.hexdigest()[:12]


def kept_run(work: Path, seed: int, key: str) -> Path | None:
    """A finished run with this configuration and seed, under any arm's name."""
    return next(iter(sorted(work.glob(f"*-seed{seed}-{key}.json"))), None)


def train_export_evaluate(cfg, out: Path, keep_log: Path) -> dict:
    """The product's train -> export on the reinforced split, then evaluate on the test split (METRICS) and on the
    validation split (the same, prefixed `val_`: where choices are made); training's log is kept at `keep_log`."""
    result = train(cfg, TRAIN, out / "train")
    shutil.copyfile(result.train_log, keep_log)
    exported = export(cfg, result.final_checkpoint, out / "export").out_dir
    row = {"wall_time_s": result.metrics["wall_time_s"]}
    for prefix, split in (("", TEST), ("val_", VAL)):
        scores = evaluate(cfg, exported, split, out / f"eval-{split.name}", train_log=result.train_log).metrics
        row.update({prefix + key: scores[name] for key, name in METRICS.items()})
    return row


def run_arm(arm: str, seed: int, work: Path) -> dict[str, float]:
    cfg = arm_config(arm, seed)
    key = run_key(cfg)
    kept = kept_run(work, seed, key)
    if kept is not None:
        return json.loads(kept.read_text())
    stem = work / f"{arm}-seed{seed}-{key}"
    with tempfile.TemporaryDirectory() as tmp:
        row = train_export_evaluate(cfg, Path(tmp), stem.parent / f"{stem.name}.csv")
    row.update(arm=arm, seed=seed, overrides=ARMS[arm])
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
        entry = {"mean": statistics.fmean(a), "sd": statistics.stdev(a) if len(a) > 1 else 0.0,
                 "diff": statistics.fmean(a) - statistics.fmean(b),
                 "paired": [round(100 * (arm_rows[s][key] - ref_rows[s][key]), 2)
                            for s in sorted(arm_rows) if s in ref_rows]}
        if len(a) > 1 and len(b) > 1:
            entry["welch_se"] = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        out[key] = entry
    return out


def cell(entry: dict[str, float], reference: bool) -> str:
    text = f"{entry['mean']:.1f} ± {entry['sd']:.1f}"
    if reference:
        return text
    se = entry.get("welch_se")
    significant = se is not None and se > 0 and abs(entry["diff"]) > 2 * se
    diff = f"{entry['diff']:+.1f}" + (f" ({abs(entry['diff']) / se:.1f} SE)" if se else "")
    return f"{text}, {'**' + diff + '**' if significant else diff}"


def write_section(runs: dict[str, dict[int, dict]], table: dict[str, dict], seeds: list[int]) -> None:
    keys = list(METRICS)
    lines = [TITLE, "",
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
    replace_section("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["default", "teacher_scale_50"], choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--screen", nargs="+", default=[], choices=list(ARMS),
                        help="arms run on the first seed only (one-seed screens)")
    parser.add_argument("--collect", action="store_true", help="publish the kept runs without training more")
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
                runs.setdefault(arm, {})[seed] = run_arm(arm, seed, args.work)
    if "default" not in runs:
        sys.exit("no kept run of the default: nothing to compare with")
    table = {arm: compare(rows, runs["default"]) for arm, rows in runs.items()}
    write_section(runs, table, args.seeds)
    best = max(runs, key=lambda arm: table[arm]["colour_shape"]["mean"])
    ref = table["default"]["colour_shape"]["mean"]
    command = ("python benchmarks/distill_screens.py --arms " + " ".join(plan) + " --seeds "
               + " ".join(map(str, args.seeds)) + (" --screen " + " ".join(args.screen) if args.screen else ""))
    publish("distill_screens", {"seeds": args.seeds, "runs": {a: {str(s): r for s, r in rows.items()}
                                                             for a, rows in runs.items()}, "table": table},
            measured=f"best arm {best}: colour+shape {table[best]['colour_shape']['mean']:.1f}%",
            reference=f"default: colour+shape {ref:.1f}%", ratio=table[best]["colour_shape"]["mean"] / ref,
            command=command)


if __name__ == "__main__":
    main()
