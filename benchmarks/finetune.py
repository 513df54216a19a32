"""Fine-tuning from pretrained weights versus training from scratch at equal steps, and the WiSE-FT curve (#19).

No public weights can be downloaded on this machine, so the "pretrained" model is one this script trains first, with
the product's own stages, on a disjoint synthetic domain. The student is an open_clip architecture (`model.open_clip`:
open_clip's CLIP with a timm MobileNetV2 tower and a 4-layer text transformer, the embedded student's sizes), and the
pretraining run's export is an open_clip local-dir (open_clip_config.json + open_clip_model.safetensors), which
fine-tuning starts from as `model.open_clip: {model: local-dir:<export>}`; online, `{model: MobileCLIP2-S0,
pretrained: dfndr2b}` takes its place unchanged:

- domain A (pretraining): the embedded generator's images whose colour is red, green, blue or yellow and whose shape
  is a circle, square or triangle;
- domain B (the user's data): purple, orange, white or black stars, crosses and diamonds.

Both are the embedded default's renderer and caption grammar (10% noisy captions in training), filtered by attribute;
no colour or shape word of B occurs in A. Per seed, B is trained for `--steps` steps from scratch and from A's
weights, with the same parameters and data order (plain CLIP, params.yaml's optimiser and schedule), then exported and
evaluated on B's test split, with A's test split as a benchmark set in CLIP_benchmark's WebDataset layout (what
fine-tuning keeps of the pretraining domain, WiSE-FT's "robustness" side) and `evaluate.wise_ft_alphas`.

    python benchmarks/finetune.py [--pretrain-steps 450] [--steps 150] [--seeds 0 1 2] [--student open_clip]

`--student lightclip` runs the same protocol with this project's own student, started from A's `final.pt` through
`model.init_from`.

Writes benchmarks/results/finetune.json and the section "Fine-tuning from pretrained weights" of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, replace_section  # noqa: E402
from shape_learning import CLIP_ONLY  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.shards import ShardSetWriter  # noqa: E402
from lightclip_core.data.synthetic import TASK_TEMPLATES, make_sample  # noqa: E402
from lightclip_core.evaluate.evaluation import evaluate  # noqa: E402
from lightclip_core.export.exporter import export  # noqa: E402
from lightclip_core.stages.start import start_weights  # noqa: E402
from lightclip_core.train.trainer import train  # noqa: E402

DOMAINS = {"A": (("red", "green", "blue", "yellow"), ("circle", "square", "triangle")),
           "B": (("purple", "orange", "white", "black"), ("star", "cross", "diamond"))}
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
RUN = [*CLIP_ONLY, "tracking.enabled=false", "export.onnx=false"]  # CLIP's loss alone, as shape_learning.py
METRICS = {"colour": "zeroshot/colour/top1", "shape": "zeroshot/shape/top1",
           "colour_shape": "zeroshot/colour_shape/top1", "i2t_R@1": "retrieval/image_to_text/R@1",
           "A_colour_shape": "benchmark/domain_A/top1"}


# open_clip's CLIP at the embedded student's sizes: timm's MobileNetV2 pooled and projected, a causal text transformer
OPEN_CLIP_STUDENT = {"embed_dim": 256, "custom_text": True,
                     "vision_cfg": {"timm_model_name": "mobilenetv2_100", "timm_model_pretrained": False,
                                    "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
                     "text_cfg": {"context_length": 32, "width": 256, "heads": 4, "layers": 4}}


def open_clip_architecture(out: Path) -> Path:
    """A config-only open_clip local-dir of OPEN_CLIP_STUDENT, with params.yaml's preprocessing: a random start."""
    image = load_config(ROOT / "params.yaml").model.image
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": OPEN_CLIP_STUDENT, "preprocess_cfg": {"mean": list(image.mean), "std": list(image.std),
                                                           "interpolation": image.interpolation}}))
    return out


def students(student: str, work: Path, pretrained: Path) -> dict[str, list[str]]:
    """The overrides of the pretraining run, the from-scratch arm and the fine-tuned arm."""
    if student == "lightclip":
        return {"pretrain": [], "scratch": [], "fine-tuned": [f"model.init_from={pretrained / 'train' / 'final.pt'}"]}
    random = "model.open_clip={model: 'local-dir:" + str(open_clip_architecture(work / "open_clip_arch")) + "'}"
    return {"pretrain": [random], "scratch": [random],
            "fine-tuned": ["model.open_clip={model: 'local-dir:" + str(pretrained / "export") + "'}"]}


def domain_tasks(domain: str) -> dict:
    colours, shapes = DOMAINS[domain]
    classes = {"colour": list(colours), "shape": list(shapes),
               "colour_shape": [f"{c} {s}" for c in colours for s in shapes]}
    return {name: {"label_key": name, "classes": classes[name], "templates": list(TASK_TEMPLATES[name])}
            for name in classes}


def domain_samples(domain: str, split: str, count: int, size: int):
    """The first `count` samples of the embedded generator's `split` that belong to `domain`."""
    colours, shapes = DOMAINS[domain]
    index = 0
    while count:
        sample = make_sample(0, split, index, size, 0.1 if split == "train" else 0.0)
        index += 1
        if sample.meta["colour"] in colours and sample.meta["shape"] in shapes:
            count -= 1
            yield sample


def write_split(out: Path, domain: str, split: str, count: int, size: int) -> Path:
    if not (out / split / "manifest.json").exists():
        writer = ShardSetWriter(out / split, split, samples_per_shard=2000)
        for sample in domain_samples(domain, split, count, size):
            writer.write(sample)
        writer.close(params={"source": "synthetic", "domain": domain, "seed": 0}, tasks=domain_tasks(domain))
    return out / split


def write_clip_benchmark_set(out: Path, domain: str, count: int, size: int) -> Path:
    """Domain `domain`'s test images as CLIP_benchmark's WebDataset export of a colour+shape classification set."""
    if (out / "test" / "nshards.txt").exists():
        return out
    classes = domain_tasks(domain)["colour_shape"]["classes"]
    (out / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "test" / "0.tar", "w") as tar:
        for n, sample in enumerate(domain_samples(domain, "test", count, size)):
            for ext, data in ((sample.image_ext, sample.image),
                              ("cls", str(classes.index(sample.meta["colour_shape"])).encode())):
                info = tarfile.TarInfo(f"s{n:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (out / "test" / "nshards.txt").write_text("1\n")
    (out / "classnames.txt").write_text("\n".join(classes) + "\n")
    templates = [t.replace("{}", "{c}") for t in TASK_TEMPLATES["colour_shape"]]
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return out


def run(overrides: list[str], train_dir: Path, test_dir: Path, out: Path) -> dict[str, float]:
    """The product's train -> export -> evaluate; metrics.json of the evaluation (cached under `out`)."""
    done = out / "eval" / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = load_config(ROOT / "params.yaml", [*RUN, *overrides])
    result = train(cfg, train_dir, out / "train", start=start_weights(cfg))  # the stage's resolution of init_from
    exported = export(cfg, result.final_checkpoint, out / "export")
    return evaluate(cfg, exported.out_dir, test_dir, out / "eval", train_log=result.train_log).metrics


def summary(rows: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = [100 * r[key] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=450)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=8000, help="training samples per domain")
    parser.add_argument("--test-size", type=int, default=250)
    parser.add_argument("--student", choices=["open_clip", "lightclip"], default="open_clip")
    parser.add_argument("--work", type=Path, default=None, help="default: /tmp/lightclip-finetune-<student>")
    args = parser.parse_args()
    args.work = args.work or Path(f"/tmp/lightclip-finetune-{args.student}")
    size = load_config(ROOT / "params.yaml").data.synthetic.image_size
    data = {d: args.work / f"domain_{d}" for d in DOMAINS}
    for d in DOMAINS:
        write_split(data[d], d, "train", args.train_size, size)
        write_split(data[d], d, "test", args.test_size, size)
    bench = write_clip_benchmark_set(args.work / "clip_benchmark_A", "A", args.test_size, size)
    a_set = ("evaluate.benchmarks=[{name: domain_A, format: wds, path: " + str(bench) + "}]")
    pretrained = args.work / "pretrain"
    arms = students(args.student, args.work, pretrained)
    run([*arms["pretrain"], f"train.max_steps={args.pretrain_steps}", "train.seed=0"], data["A"] / "train",
        data["A"] / "test", pretrained)
    runs: dict[str, list[dict[str, float]]] = {"scratch": [], "fine-tuned": []}
    for seed in args.seeds:
        common = [f"train.max_steps={args.steps}", f"train.seed={seed}", a_set]
        runs["scratch"].append(run([*common, *arms["scratch"]], data["B"] / "train", data["B"] / "test",
                                   args.work / f"scratch-{seed}"))
        runs["fine-tuned"].append(run([*common, *arms["fine-tuned"], f"evaluate.wise_ft_alphas={ALPHAS}"],
                                      data["B"] / "train", data["B"] / "test", args.work / f"finetune-{seed}"))
        print(f"seed {seed}: " + json.dumps({arm: {k: rows[-1][v] for k, v in METRICS.items()}
                                             for arm, rows in runs.items()}), flush=True)
    table = {arm: {k: summary(rows, v) for k, v in METRICS.items()} for arm, rows in runs.items()}
    curve = {f"{a:g}": {k: summary(runs["fine-tuned"], f"wise_ft/{a:g}/{v}") for k, v in METRICS.items()}
             for a in ALPHAS}
    command = (f"python benchmarks/finetune.py --pretrain-steps {args.pretrain_steps} --steps {args.steps} "
               f"--seeds {' '.join(map(str, args.seeds))} --student {args.student}")
    on_a = run(arms["pretrain"], data["A"] / "train", data["A"] / "test", pretrained)  # cached: the pretraining run
    result = {"name": "finetune", "machine": machine(), "command": command, "student": args.student, "table": table,
              "wise_ft": curve, "runs": runs,
              "pretrained_on_A": {k: v for k, v in on_a.items() if k in METRICS.values()}}
    (ROOT / "benchmarks" / "results" / "finetune.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_section(table, curve, args, command)


STUDENTS = {"open_clip": "an open_clip student (open_clip's CLIP with a timm MobileNetV2 tower and a 4-layer text "
                         "transformer, the embedded student's sizes; `model.open_clip`)",
            "lightclip": "this project's default student"}
SAVED = {"open_clip": "an open_clip local-dir (its export: open_clip_config.json + open_clip_model.safetensors)",
         "lightclip": "a training checkpoint"}
START = {"open_clip": "`model.open_clip: {model: local-dir:<A's export>}`", "lightclip": "`model.init_from`"}


def write_section(table, curve, args, command: str) -> None:
    header = "| | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    cell = lambda m: f"{m[0]:.1f} ± {m[1]:.1f}"  # noqa: E731
    rows = "".join(f"| {arm} | " + " | ".join(cell(v[k]) for k in METRICS) + " |\n" for arm, v in table.items())
    wise = "".join(f"| alpha {a} | " + " | ".join(cell(v[k]) for k in METRICS) + " |\n" for a, v in curve.items())
    section = (
        "## Fine-tuning from pretrained weights, and WiSE-FT (benchmarks/finetune.py)\n\n"
        f"`{command}` on {machine()}. No public weights can be downloaded here: the \"pretrained\" model is "
        f"{STUDENTS[args.student]} trained {args.pretrain_steps} steps on a disjoint synthetic domain A (red, green, "
        f"blue, yellow circles, squares, triangles) and saved as {SAVED[args.student]}; the target domain B is "
        "purple, orange, white, black stars, crosses, diamonds (the same renderer and caption grammar; no colour or "
        f"shape word of B occurs in A). Both arms train {args.steps} steps on B with the same parameters and data "
        "order per seed (plain CLIP, params.yaml's optimiser and schedule), the fine-tuned one from A's weights "
        f"({START[args.student]}). Zero-shot top-1 and strict R@1 (%) on B's test split, and `A_colour_shape` on A's "
        "test split read as a CLIP_benchmark WebDataset set (`evaluate.benchmarks`): mean ± sd over "
        f"{len(args.seeds)} seeds. Online, a real open_clip model and tag (`model.open_clip: {{model: MobileCLIP2-S0, "
        "pretrained: dfndr2b}`) take the place of A's export with the same keys.\n\n" + header + rows +
        "\nWiSE-FT over the fine-tuned runs (`evaluate.wise_ft_alphas`; alpha 0 is A's model, 1 the fine-tuned "
        "one):\n\n" + header + wise + "\n")
    replace_section(section)


if __name__ == "__main__":
    main()
