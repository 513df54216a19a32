"""Issue #16 item 2 on a noisier variant of the embedded data: LightCLIP's three objectives against plain CLIP where a
larger share of the training captions name one attribute wrongly (`data.synthetic.noise_fraction`, 0.3 against the
default's 0.1), which is where softened targets should matter most.

No distillation, so no teachers: the variant's training split is prepared afresh by the product's own `prepare` (the
same images and the same val/test splits; only training captions differ) into `artifacts/screens/<key>/`, and both
arms train on its original images (no augmentation: the split is not reinforced), the same data order per seed, at
the default run's step budget. Each run is evaluated on the committed (clean) test and validation splits, on the
test split every sixth of training. Kept runs (benchmarks/results/noisy-runs) are reused as in `distill_screens.py`;
the comparison (mean ± sd, difference, Welch SE) is written to docs/BENCHMARKS.md and
benchmarks/results/noisy_screens.json.

    python benchmarks/noisy_screens.py [--noise 0.3] [--seeds 0] [--collect]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_screens as ds  # noqa: E402
from common import ROOT, config_key, publish, replace_section  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.prepare import prepare  # noqa: E402

ARMS = ("plain_clip", "lightclip_no_distill")
SCREENS = ROOT / "artifacts" / "screens"  # the variants' prepared data, one directory per data configuration
TITLE = "## Issue #16 item 2 on the noisy variant of the embedded data (benchmarks/noisy_screens.py)"


def variant_overrides(noise: float) -> tuple[str, ...]:
    return (f"data.synthetic.noise_fraction={noise}",)


def variant_split(noise: float) -> Path:
    """The variant's prepared data directory, named by its data configuration; prepared once."""
    data_cfg = load_config(ROOT / "params.yaml", list(variant_overrides(noise))).data
    out = SCREENS / f"data-{config_key(data_cfg)}"
    if not (out / "train" / "manifest.json").exists():
        prepare(data_cfg, out)
    return out


def section(noise: float, runs: dict[str, dict[int, dict]], table: dict[str, dict]) -> str:
    plain, objectives = table["plain_clip"], table["lightclip_no_distill"]
    lines = [TITLE, "",
             f"`data.synthetic.noise_fraction={noise}` (the default: 0.1), no distillation, original images (no "
             "augmentation: the split is not reinforced), the default run's step budget; test split (clean). Each "
             "cell: mean ± sd over the seeds in points, then the difference to plain CLIP with its Welch SE where "
             "both have two seeds.",
             "", "| arm | seeds | " + " | ".join(ds.LABELS[k] for k in ds.METRICS) + " | train wall |",
             "|---|---|" + "---|" * len(ds.METRICS) + "---|"]
    for arm in ARMS:
        wall = sum(r["wall_time_s"] for r in runs[arm].values()) / len(runs[arm])
        cells = [ds.cell(table[arm][k], arm == "plain_clip") for k in ds.METRICS]
        lines.append(f"| {arm} | {len(runs[arm])} | " + " | ".join(cells) + f" | {wall:.0f} s |")
    half = ds.halfway_scores(runs, "lightclip_no_distill"), ds.halfway_scores(runs, "plain_clip")
    at_half = ds.welch(*half) if all(half) else None
    lines += ["", f"Colour+shape, LightCLIP's objectives minus plain CLIP: end "
                  f"{objectives['colour_shape']['diff']:+.1f} points (paired by seed "
                  f"{objectives['colour_shape']['paired']})"
              + (f", at plain CLIP's half-way checkpoint {at_half[0]:+.1f}" if at_half else "")
              + f"; plain CLIP {plain['colour_shape']['mean']:.1f}%."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--collect", action="store_true", help="publish the kept runs without training more")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "noisy-runs")
    args = parser.parse_args()
    if not 0 <= args.noise <= 1:
        parser.error(f"--noise={args.noise}: a fraction in [0, 1]")
    if not all((split / "manifest.json").exists() for split in (ds.VAL, ds.TEST)):
        sys.exit(f"no {ds.VAL} or {ds.TEST}: run `dvc repro prepare` first")
    train_dir = variant_split(args.noise) / "train"
    extra = variant_overrides(args.noise)
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            if args.collect:
                kept = ds.kept_run(args.work, seed, ds.run_key(ds.arm_config(arm, seed, extra), train_dir))
                if kept is not None:
                    runs[arm][seed] = json.loads(kept.read_text())
            else:
                runs[arm][seed] = ds.run_arm(arm, seed, args.work, curve=True, train_dir=train_dir, extra=extra)
    if not all(runs.values()):
        sys.exit("no kept run of one of the arms: nothing to compare")
    table = {arm: ds.compare(rows, runs["plain_clip"]) for arm, rows in runs.items()}
    replace_section(section(args.noise, runs, table))
    diff = table["lightclip_no_distill"]["colour_shape"]
    publish("noisy_screens", {"noise_fraction": args.noise, "seeds": args.seeds, "table": table,
                              "runs": {a: {str(s): r for s, r in rows.items()} for a, rows in runs.items()}},
            measured=f"LightCLIP's objectives at caption noise {args.noise}: colour+shape {diff['mean']:.1f}%",
            reference=f"plain CLIP: {table['plain_clip']['colour_shape']['mean']:.1f}%",
            ratio=diff["mean"] / table["plain_clip"]["colour_shape"]["mean"],
            command=f"python benchmarks/noisy_screens.py --noise {args.noise} --seeds "
                    + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
