"""The LightCLIP ablation on the embedded default: each objective added to CLIP, at equal steps, several seeds.

Every run goes through the product's own stages (train -> export -> evaluate) with `params.yaml` plus the
configuration's overrides, so what is measured is what `dvc repro` would produce. Two phases:

1. step time: every configuration trains `--time-steps` steps in turn on all cores; the figure is the median step
   time after warm-up, reported as a ratio to plain CLIP measured in the same run;
2. accuracy: every (configuration, seed) trains `--steps` steps, `--jobs` runs at a time (cores split between
   them); zero-shot top-1 (colour, shape, colour+shape) and retrieval R@1 both ways, mean and spread over seeds.
   Finished runs are kept under `--work` and skipped on a rerun, so an interrupted ablation resumes.

    python benchmarks/ablation.py [--family lightclip|losses] [--steps 468] [--seeds 0 1 2] [--jobs 2] [--configs ...]

`--family losses` (issue #20) compares plain CLIP with VSE++'s hinges, SigLIP's sigmoid loss and ALBEF's image-text
matching (hard or random negatives) and also reports zero-shot colour+shape on the images whose most similar wrong
class shares their colour (`same_colour_rival`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median_after_warmup, publish, replace_section  # noqa: E402

import torch  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.prepare import prepare  # noqa: E402
from lightclip_core.data.shards import read_manifest  # noqa: E402
from lightclip_core.evaluate.evaluation import embed_test_set, evaluate, select_tasks  # noqa: E402
from lightclip_core.export.exporter import export  # noqa: E402
from lightclip_core.export.load import load_exported  # noqa: E402
from lightclip_core.models.clip import zero_shot_weights  # noqa: E402
from lightclip_core.train.trainer import plan_steps, train  # noqa: E402

_ONLY_CLIP = ["objectives.contrastive.soft_targets=none", "objectives.token.enabled=false",
              "objectives.mlm.enabled=false"]
_NO_DISTILL = ["objectives.distill.enabled=false"]  # the ablations train on the plain split, not the reinforced one
CONFIGS: dict[str, list[str]] = {  # overrides of params.yaml, each spelling out the three objectives it trains
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
    "all": ["objectives.contrastive.soft_targets=uniform", "objectives.token.enabled=true",
            "objectives.mlm.enabled=true"],
}
# issue #20: the instance-level loss replaced, or ALBEF's image-text matching added, each against plain CLIP
_SIGMOID = ["objectives.contrastive.loss=sigmoid", "model.init_logit_bias=-10", "model.init_logit_scale=2.3026"]
LOSS_CONFIGS: dict[str, list[str]] = {
    "clip": _ONLY_CLIP,
    "max_violation": _ONLY_CLIP + ["objectives.contrastive.loss=max_violation"],
    "sum_hinge": _ONLY_CLIP + ["objectives.contrastive.loss=sum_hinge"],
    "sigmoid": _ONLY_CLIP + _SIGMOID,
    "itm_hard": _ONLY_CLIP + ["objectives.itm.enabled=true", "objectives.itm.negatives=hard"],
    "itm_random": _ONLY_CLIP + ["objectives.itm.enabled=true", "objectives.itm.negatives=random"],
    # from the identity start ITM stays at chance; BERT/ALBEF's initialisation of the fusion's output projection
    "itm_hard_init02": _ONLY_CLIP + ["objectives.itm.enabled=true", "objectives.itm.negatives=hard",
                                     "objectives.mlm.fusion_init_std=0.02"],
    "itm_random_init02": _ONLY_CLIP + ["objectives.itm.enabled=true", "objectives.itm.negatives=random",
                                       "objectives.mlm.fusion_init_std=0.02"],
}
FAMILIES = {"lightclip": CONFIGS, "losses": LOSS_CONFIGS}
METRICS = {"colour": "zeroshot/colour/top1", "shape": "zeroshot/shape/top1",
           "colour_shape": "zeroshot/colour_shape/top1", "i2t_R@1": "retrieval/image_to_text/R@1",
           "t2i_R@1": "retrieval/text_to_image/R@1"}
WARMUP = 5


def run_config(name: str, extra: list[str]):
    overrides = {**CONFIGS, **LOSS_CONFIGS}[name]  # the two families agree on "clip"
    return load_config(ROOT / "params.yaml", [*overrides, *_NO_DISTILL, "tracking.enabled=false", "export.onnx=false",
                                              *extra])


@torch.inference_mode()
def same_colour_rival(cfg, export_dir: Path, split_dir: Path) -> dict[str, float]:
    """Zero-shot colour+shape top-1 on the images whose most similar wrong class (by the model's own scores) has
    their colour, so only shape tells the two apart, and the share of images that are such."""
    exported = load_exported(export_dir)
    manifest = read_manifest(split_dir)
    tasks = select_tasks(manifest, ["colour_shape"], split_dir)
    emb = embed_test_set(exported, split_dir, manifest, tasks, cfg.evaluate.batch_size)
    classes = tasks["colour_shape"]["classes"]
    templates = list(tasks["colour_shape"].get("templates") or cfg.evaluate.templates)
    logits = emb.images @ zero_shot_weights(exported.model, classes, templates, exported.tokenize).cpu()
    labels = emb.labels["colour_shape"]
    rival = logits.scatter(1, labels[:, None], float("-inf")).argmax(dim=1)
    colour = [name.split()[0] for name in classes]
    subset = torch.tensor([colour[r] == colour[t] for r, t in zip(rival.tolist(), labels.tolist())])
    correct = logits.argmax(dim=1) == labels
    return {"same_colour_rival_top1": float(correct[subset].float().mean()) if subset.any() else 0.0,
            "same_colour_rival_share": float(subset.float().mean())}


def ensure_data(work: Path) -> Path:
    """The embedded default's shards: the pipeline's own if `dvc repro` made them, else prepared here."""
    data = ROOT / "artifacts" / "data"
    if (data / "train" / "manifest.json").exists() and (data / "test" / "manifest.json").exists():
        return data
    data = work / "data"
    if not (data / "test" / "manifest.json").exists():
        prepare(load_config(ROOT / "params.yaml").data, data)
    return data


def train_export_evaluate(cfg, data: Path, split: str, out: Path, keep_log: Path | None = None) -> dict[str, float]:
    """The product's train -> export -> evaluate on `data/<split>`: the METRICS the tables report, and training's
    wall time; `keep_log` keeps a copy of the training log (every objective's terms per step)."""
    result = train(cfg, data / "train", out / "train")
    if keep_log is not None:
        shutil.copyfile(result.train_log, keep_log)
    exported = export(cfg, result.final_checkpoint, out / "export")
    metrics = evaluate(cfg, exported.out_dir, data / split, out / "eval", train_log=result.train_log).metrics
    row = {key: metrics[source] for key, source in METRICS.items()}
    row.update(same_colour_rival(cfg, exported.out_dir, data / split), wall_time_s=result.metrics["wall_time_s"])
    return row


def one_run(name: str, seed: int, steps: int, data: Path, out: Path, threads: int | None,
            keep_log: Path | None = None) -> dict[str, float]:
    """train -> export -> evaluate for one (configuration, seed) on the test split."""
    extra = [f"train.seed={seed}", f"train.max_steps={steps}"] + ([f"train.threads={threads}"] if threads else [])
    return train_export_evaluate(run_config(name, extra), data, "test", out, keep_log)


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


RIVAL = {"same_colour_rival_top1": "c+s, rival of the same colour", "same_colour_rival_share": "its share"}


def summarise(runs: dict[str, list[dict[str, float]]], times: dict[str, float]) -> dict[str, dict[str, float]]:
    table = {}
    for name, rows in runs.items():
        entry = {}
        for key in [*METRICS, *(k for k in RIVAL if all(k in r for r in rows))]:
            values = [100 * r[key] for r in rows]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["seeds"] = len(rows)
        entry["step_time_s"] = times[name]
        entry["step_time_ratio"] = times[name] / times["clip"]
        table[name] = entry
    return table


TITLES = {"lightclip": "## LightCLIP ablation (benchmarks/ablation.py)",
          "losses": "## Matching losses: VSE++'s hinges, SigLIP's sigmoid, ALBEF's ITM (benchmarks/ablation.py "
                    "--family losses)"}


def write_section(table: dict[str, dict[str, float]], args) -> None:
    """The family's table as its own section of docs/BENCHMARKS.md (replaced on every run; prose below the table
    goes with it, so keep the interpretation in a section of its own)."""
    rival = [k for k in RIVAL if all(f"{k}_mean" in e for e in table.values())]
    lines = [TITLES[args.family], "",
             f"Embedded default, {args.steps} steps, batch {run_config('clip', []).train.batch_size}, seeds "
             f"{', '.join(map(str, args.seeds))}, test split: mean ± sd in points; step time relative to plain CLIP, "
             "measured sequentially in the same run.", "",
             "| configuration | seeds | colour | shape | colour+shape | i2t R@1 | t2i R@1 | "
             + "".join(f"{RIVAL[k]} | " for k in rival) + "step time |",
             "|---|---|---|---|---|---|---|" + "---|" * len(rival) + "---|"]
    for name, e in table.items():
        cells = [f"{e[f'{k}_mean']:.1f} ± {e[f'{k}_sd']:.1f}" for k in [*METRICS, *rival]]
        lines.append(f"| {name} | {e['seeds']} | " + " | ".join(cells) + f" | {e['step_time_ratio']:.2f}x |")
    replace_section("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the embedded default's schedule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=30)
    parser.add_argument("--family", choices=list(FAMILIES), default="lightclip",
                        help="lightclip: LightCLIP's objectives; losses: the instance-level losses and ITM (#20)")
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted({*CONFIGS, *LOSS_CONFIGS}),
                        help="default: every configuration of the family")
    parser.add_argument("--collect", action="store_true", help="publish the finished runs without training more")
    parser.add_argument("--work", type=Path, default=None, help="default: benchmarks/results/<family>-runs")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = args.configs or list(FAMILIES[args.family])
    args.work = args.work or ROOT / "benchmarks" / "results" / (
        "ablation-runs" if args.family == "lightclip" else f"{args.family}-runs")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.steps is None:
        cfg = run_config("clip", [])
        args.steps = plan_steps(cfg, cfg.data.synthetic.num_train)[1]
    if args.one:
        name, seed = args.one[0], int(args.one[1])
        with tempfile.TemporaryDirectory() as tmp:
            stem = args.work / f"{name}-seed{seed}-steps{args.steps}"
            row = one_run(name, seed, args.steps, args.data, Path(tmp), args.threads, stem.with_suffix(".csv"))
        stem.with_suffix(".json").write_text(json.dumps(row) + "\n")
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
    command = (f"python benchmarks/ablation.py --family {args.family} --steps {args.steps} --seeds "
               f"{' '.join(map(str, args.seeds))}")
    if args.family == "losses":
        best = max((n for n in table if n != "clip"), key=lambda n: table[n]["colour_shape_mean"])
    else:
        best = "all" if "all" in table else args.configs[-1]
    entry = table[best]
    gain = entry["colour_shape_mean"] - table["clip"]["colour_shape_mean"]
    publish("lightclip_ablation" if args.family == "lightclip" else "matching_losses",
            {"steps": args.steps, "seeds": args.seeds, "table": table},
            measured=f"{best}: colour+shape {entry['colour_shape_mean']:.1f}% ({gain:+.1f} points), "
                     f"step time {entry['step_time_ratio']:.2f}x",
            reference=f"CLIP alone: colour+shape {table['clip']['colour_shape_mean']:.1f}%",
            ratio=entry["step_time_ratio"], command=command)

if __name__ == "__main__":
    main()
