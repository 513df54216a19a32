"""The LightCLIP ablation on the embedded default: each objective added to CLIP, at equal steps, several seeds.

Every run goes through the product's own stages (train -> export -> evaluate) with `params.yaml` plus the
configuration's overrides, so what is measured is what `dvc repro` would produce. Two phases:

1. step time: every configuration trains `--time-steps` steps in turn on all cores; the figure is the median step
   time after warm-up, reported as a ratio to plain CLIP measured in the same run;
2. accuracy: every (configuration, seed) trains `--steps` steps, `--jobs` runs at a time (cores split between
   them); zero-shot top-1 (colour, shape, colour+shape) and retrieval R@1 both ways, mean and spread over seeds.
   Finished runs are kept under `--work` and skipped on a rerun, so an interrupted ablation resumes.

    python benchmarks/ablation.py [--steps 468] [--seeds 0 1 2] [--jobs 2] [--configs clip all ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median_after_warmup, publish, replace_section  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.prepare import prepare  # noqa: E402
from lightclip_core.evaluate.evaluation import evaluate  # noqa: E402
from lightclip_core.export.exporter import export  # noqa: E402
from lightclip_core.train.trainer import plan_steps, train  # noqa: E402

_ONLY_CLIP = ["objectives.contrastive.soft_targets=none", "objectives.token.enabled=false",
              "objectives.mlm.enabled=false"]
CONFIGS: dict[str, list[str]] = {  # overrides of params.yaml, whose default trains all three objectives
    "clip": _ONLY_CLIP,
    "soft_constant": _ONLY_CLIP[1:] + ["objectives.contrastive.soft_targets=uniform",
                                       "objectives.contrastive.eps_schedule=constant"],
    "soft_progressive": _ONLY_CLIP[1:] + ["objectives.contrastive.soft_targets=uniform",
                                          "objectives.contrastive.eps_schedule=linear"],
    "token_hungarian": [_ONLY_CLIP[0], _ONLY_CLIP[2], "objectives.token.enabled=true",
                        "objectives.token.matcher=hungarian"],
    "token_max": [_ONLY_CLIP[0], _ONLY_CLIP[2], "objectives.token.enabled=true", "objectives.token.matcher=max"],
    "mlm_no_fusion": _ONLY_CLIP[:2] + ["objectives.mlm.enabled=true", "objectives.mlm.fusion=[]"],
    "mlm_fusion": _ONLY_CLIP[:2] + ["objectives.mlm.enabled=true"],
    "all": [],
}
METRICS = {"colour": "zeroshot/colour/top1", "shape": "zeroshot/shape/top1",
           "colour_shape": "zeroshot/colour_shape/top1", "i2t_R@1": "retrieval/image_to_text/R@1",
           "t2i_R@1": "retrieval/text_to_image/R@1"}
WARMUP = 5


def run_config(name: str, extra: list[str]):
    return load_config(ROOT / "params.yaml", [*CONFIGS[name], "tracking.enabled=false", "export.onnx=false", *extra])


def ensure_data(work: Path) -> Path:
    """The embedded default's shards: the pipeline's own if `dvc repro` made them, else prepared here."""
    data = ROOT / "artifacts" / "data"
    if (data / "train" / "manifest.json").exists() and (data / "test" / "manifest.json").exists():
        return data
    data = work / "data"
    if not (data / "test" / "manifest.json").exists():
        prepare(load_config(ROOT / "params.yaml").data, data)
    return data


def train_export_evaluate(cfg, data: Path, split: str, out: Path) -> dict[str, float]:
    """The product's train -> export -> evaluate on `data/<split>`: the METRICS the tables report, and training's
    wall time."""
    result = train(cfg, data / "train", out / "train")
    exported = export(cfg, result.final_checkpoint, out / "export")
    metrics = evaluate(cfg, exported.out_dir, data / split, out / "eval", train_log=result.train_log).metrics
    row = {key: metrics[source] for key, source in METRICS.items()}
    row["wall_time_s"] = result.metrics["wall_time_s"]
    return row


def one_run(name: str, seed: int, steps: int, data: Path, out: Path, threads: int | None) -> dict[str, float]:
    """train -> export -> evaluate for one (configuration, seed) on the test split."""
    extra = [f"train.seed={seed}", f"train.max_steps={steps}"] + ([f"train.threads={threads}"] if threads else [])
    return train_export_evaluate(run_config(name, extra), data, "test", out)


def step_times(name: str, steps: int, data: Path, out: Path) -> float:
    cfg = run_config(name, [f"train.max_steps={steps}", f"train.warmup_steps={steps}"])
    with open(train(cfg, data / "train", out).train_log) as f:
        times = [cfg.train.batch_size / float(r["samples_per_s"]) for r in csv.DictReader(f)]
    return median_after_warmup(times, WARMUP)


def accuracy_phase(args, data: Path, work: Path) -> dict[str, list[dict[str, float]]]:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(n, s) for s in args.seeds for n in args.configs]  # seed-major: an early stop still covers every config

    def launch(job: tuple[str, int]) -> None:
        name, seed = job
        done = work / f"{name}-seed{seed}-steps{args.steps}.json"
        if done.exists():
            return
        cmd = [sys.executable, __file__, "--one", name, str(seed), "--steps", str(args.steps), "--work",
               str(work), "--threads", str(threads), "--data", str(data)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"done {name} seed {seed}: {done.read_text().strip()}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, todo))
    return collect(args, work)


def collect(args, work: Path) -> dict[str, list[dict[str, float]]]:
    """The finished runs of every configuration (all seeds once the accuracy phase is complete)."""
    runs = {n: [json.loads(f.read_text()) for s in args.seeds
                if (f := work / f"{n}-seed{s}-steps{args.steps}.json").exists()] for n in args.configs}
    return {n: rows for n, rows in runs.items() if rows}


def summarise(runs: dict[str, list[dict[str, float]]], times: dict[str, float]) -> dict[str, dict[str, float]]:
    table = {}
    for name, rows in runs.items():
        entry = {}
        for key in METRICS:
            values = [100 * r[key] for r in rows]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["seeds"] = len(rows)
        entry["step_time_s"] = times[name]
        entry["step_time_ratio"] = times[name] / times["clip"]
        table[name] = entry
    return table


def write_section(table: dict[str, dict[str, float]], args) -> None:
    """The ablation table as its own section of docs/BENCHMARKS.md (replaced on every run)."""
    lines = ["## LightCLIP ablation (benchmarks/ablation.py)", "",
             f"Embedded default, {args.steps} steps, batch {run_config('clip', []).train.batch_size}, seeds "
             f"{', '.join(map(str, args.seeds))}: mean ± sd in points; step time relative to plain CLIP, measured "
             "sequentially in the same run.", "",
             "| configuration | seeds | colour | shape | colour+shape | i2t R@1 | t2i R@1 | step time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in table.items():
        cells = [f"{e[f'{k}_mean']:.1f} ± {e[f'{k}_sd']:.1f}" for k in METRICS]
        lines.append(f"| {name} | {e['seeds']} | " + " | ".join(cells) + f" | {e['step_time_ratio']:.2f}x |")
    replace_section("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the embedded default's schedule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=30)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--collect", action="store_true", help="publish the finished runs without training more")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "ablation-runs")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.steps is None:
        cfg = run_config("clip", [])
        args.steps = plan_steps(cfg, cfg.data.synthetic.num_train)[1]
    if args.one:
        name, seed = args.one[0], int(args.one[1])
        with tempfile.TemporaryDirectory() as tmp:
            row = one_run(name, seed, args.steps, args.data, Path(tmp), args.threads)
        (args.work / f"{name}-seed{seed}-steps{args.steps}.json").write_text(json.dumps(row) + "\n")
        return
    if "clip" not in args.configs:
        args.configs.insert(0, "clip")  # the reference of every ratio
    data = ensure_data(args.work)
    times_file = args.work / f"step-times-{args.time_steps}.json"  # delete it to measure again
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            if name not in times:
                times[name] = step_times(name, args.time_steps, data, Path(tmp) / name)
    times_file.write_text(json.dumps(times, indent=1) + "\n")
    print(json.dumps(times), flush=True)
    runs = collect(args, args.work) if args.collect else accuracy_phase(args, data, args.work)
    table = summarise(runs, times)
    write_section(table, args)
    best = table.get("all", table[args.configs[-1]])
    gain = best["colour_shape_mean"] - table["clip"]["colour_shape_mean"]
    publish("lightclip_ablation", {"steps": args.steps, "seeds": args.seeds, "table": table},
            measured=f"all objectives: colour+shape {best['colour_shape_mean']:.1f}% ({gain:+.1f} points), "
                     f"step time {best['step_time_ratio']:.2f}x",
            reference=f"CLIP alone: colour+shape {table['clip']['colour_shape_mean']:.1f}%",
            ratio=best["step_time_ratio"],
            command=f"python benchmarks/ablation.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
