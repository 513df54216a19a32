"""What keeps the CLIP student from learning shape on the embedded default (issue #15, item 4), one suspect at a time.

Two kinds of arm, all on the embedded default's prepared training split (plain images, no stored views), all scored
on the validation split (choices are made there; the test split stays the benchmark):

- `probe`: an image tower (MobileNetV2, the student's until RepViT-M0.9, or the arm's own timm tower) with a linear
  head, trained supervised on the shape label (cross-entropy, AdamW, warm-up then constant): the tower's capacity to
  learn shape at 64 px in this many steps;
- CLIP arms: the product's own train -> export -> evaluate with `params.yaml` and the MobileNetV2 tower, CLIP's loss
  only (no soft targets, token, MLM or distillation), plus each arm's overrides: one suspect changed against `clip`.

    python benchmarks/shape_learning.py [--steps 300] [--seeds 0] [--arms probe clip image_lr ...]

Finished runs are kept under `--work` (one JSON each) and skipped on a rerun; `--collect` republishes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import METRICS, ensure_data, train_export_evaluate  # noqa: E402
from common import ROOT, publish, replace_section  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.shards import decode_image, iter_raw_samples  # noqa: E402
from lightclip_core.data.synthetic import SHAPES  # noqa: E402
from lightclip_core.data.transforms import image_transform  # noqa: E402

# the arms measure the MobileNetV2 student (the default until RepViT-M0.9 replaced it on this benchmark's evidence),
# so their kept runs stay comparable; an arm's own override of the tower still wins
CLIP_ONLY = ["model.image.tower=mobilenetv2_100", "objectives.contrastive.soft_targets=none",
             "objectives.token.enabled=false", "objectives.mlm.enabled=false", "objectives.distill.enabled=false"]
ARMS: dict[str, list[str]] = {  # each CLIP arm: CLIP_ONLY plus these overrides of params.yaml
    "clip": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine"],
    "image_lr": ["train.lr=0.001", "train.image_lr=0.003", "train.schedule=cosine"],
    "constant_lr": ["train.lr=0.001", "train.image_lr=null", "train.schedule=constant"],
    "image_lr_constant": ["train.lr=0.001", "train.image_lr=0.003", "train.schedule=constant"],
    "logit_scale_50": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine",
                       "model.init_logit_scale=3.912"],
    "batch_256": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine", "train.batch_size=256"],
    "os16": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine", "model.image.output_stride=16"],
    "os16_image_lr": ["train.lr=0.001", "train.image_lr=0.003", "train.schedule=cosine",
                      "model.image.output_stride=16"],
    "os16_constant": ["train.lr=0.001", "train.image_lr=null", "train.schedule=constant",
                      "model.image.output_stride=16"],
    # the tower that learns shape supervised in 300 steps (probe_resnet18), under CLIP's loss
    "resnet18": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine", "model.image.tower=resnet18"],
    # batches of two or four colours (colour_group_root): 63 or 31 same-colour negatives per positive instead of ~15
    "colour_pairs": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine", "train.shuffle_buffer=0"],
    "colour_quads": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine", "train.shuffle_buffer=0"],
    "no_shuffle_buffer": ["train.lr=0.001", "train.image_lr=null", "train.schedule=cosine", "train.shuffle_buffer=0"],
}
PROBES: dict[str, dict] = {  # supervised probes: the tower, its input size and timm keyword arguments
    "probe": {},
    "probe_128px": {"size": 128},
    "probe_os16": {"kwargs": {"output_stride": 16}},
    "probe_resnet18": {"tower": "resnet18"},
    # mobile towers of timm: which learns shape at 64 px as fast as the ResNet-18 does?
    "probe_effb0": {"tower": "efficientnet_b0"},
    "probe_mobileone_s0": {"tower": "mobileone_s0"},
    "probe_mnv3": {"tower": "mobilenetv3_large_100"},
    "probe_repvit_m0_9": {"tower": "repvit_m0_9"},
}
PROBE_LR = 3e-3
PROBE_WARMUP = 30


def base_config(extra: list[str]):
    return load_config(ROOT / "params.yaml", [*CLIP_ONLY, "tracking.enabled=false", "export.onnx=false", *extra])


COLOUR_GROUPS = {"colour_pairs": 2, "colour_quads": 4}


def colour_group_root(data: Path, out: Path, batch: int, colours: int, seed: int) -> Path:
    """A copy of `data` whose training split is written one batch per shard, each batch `colours` colours with
    `batch / colours` samples of each (colours drawn at random, samples without replacement, leftovers dropped); `val`
    is the original. With `train.shuffle_buffer=0` every training batch is one such shard (shards are shuffled per
    epoch, samples within a shard are not), so each positive has `batch / colours - 1` negatives of its own colour
    where the shuffled split of 8 colours gives it about `batch / 8 - 1`: colour alone meets less of the loss."""
    import random

    from lightclip_core.data.shards import Sample, ShardSetWriter, read_manifest

    root = out / f"colour-groups-{colours}-{batch}-seed{seed}"
    if (root / "train" / "manifest.json").exists():
        return root
    manifest = read_manifest(data / "train")
    by_colour: dict[str, list[dict]] = {}
    for raw in iter_raw_samples(sorted(str(p) for p in (data / "train").glob("*.tar"))):
        by_colour.setdefault(json.loads(raw["json"])["colour"], []).append(raw)
    rng = random.Random(seed)
    for samples in by_colour.values():
        rng.shuffle(samples)
    writer = ShardSetWriter(root / "train", "train", samples_per_shard=batch)
    share = batch // colours
    while True:
        left = [c for c, samples in by_colour.items() if len(samples) >= share]
        if len(left) < colours:
            break
        for colour in rng.sample(left, colours):
            for raw in (by_colour[colour].pop() for _ in range(share)):
                ext = next(k for k in raw if k in ("png", "jpg", "jpeg", "webp"))
                writer.write(Sample(raw["__key__"], raw[ext], ext, raw["txt"].decode(), json.loads(raw["json"])))
    writer.close(params={**manifest.get("params", {}), "batch_order": f"{colours} colours x {share}"},
                 tasks=manifest.get("tasks"))
    (root / "val").symlink_to((data / "val").resolve())
    return root


def clip_run(arm: str, seed: int, steps: int, data: Path, out: Path) -> dict[str, float]:
    cfg = base_config([*ARMS[arm], f"train.seed={seed}", f"train.max_steps={steps}"])
    if arm in COLOUR_GROUPS:
        data = colour_group_root(data, out, cfg.train.batch_size, COLOUR_GROUPS[arm], seed)
    return train_export_evaluate(cfg, data, "val", out)


def load_split(path: Path, cfg, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a prepared split, preprocessed as evaluation does (at `size`), and its shape label."""
    m = cfg.model
    transform = image_transform(size, m.image.mean, m.image.std, m.image.interpolation)
    images, labels = [], []
    for raw in iter_raw_samples(sorted(str(p) for p in path.glob("*.tar"))):
        images.append(transform(decode_image(raw)))
        labels.append(SHAPES.index(json.loads(raw["json"])["shape"]))
    return torch.stack(images), torch.tensor(labels)


def probe_run(arm: str, seed: int, steps: int, data: Path, batch: int) -> dict[str, float]:
    """A tower trained supervised on shape: its validation accuracy after `steps` steps."""
    import timm

    cfg = base_config([])
    spec = PROBES[arm]
    size = spec.get("size", cfg.model.image.size)
    torch.manual_seed(seed)
    x_train, y_train = load_split(data / "train", cfg, size)
    x_val, y_val = load_split(data / "val", cfg, size)
    net = timm.create_model(spec.get("tower", cfg.model.image.tower), pretrained=False, num_classes=len(SHAPES),
                            **spec.get("kwargs", {}))
    optimizer = torch.optim.AdamW(net.parameters(), lr=PROBE_LR, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / PROBE_WARMUP))
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % len(order)]
        loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    wall = time.perf_counter() - start
    net.eval()
    with torch.inference_mode():
        correct = sum(int((net(x_val[i:i + 256]).argmax(1) == y_val[i:i + 256]).sum())
                      for i in range(0, len(y_val), 256))
    return {"shape": correct / len(y_val), "wall_time_s": wall}


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    table = {}
    for arm, rows in runs.items():
        entry: dict[str, float] = {"seeds": len(rows)}
        for key in rows[0]:
            values = [r[key] for r in rows]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[arm] = entry
    return table


def write_section(table: dict[str, dict[str, float]], args) -> None:
    title = "## What keeps CLIP from learning shape (benchmarks/shape_learning.py)"
    lines = [title, "",
             f"Embedded default's training split, {args.steps} steps, batch {base_config([]).train.batch_size}, seeds "
             f"{', '.join(map(str, args.seeds))}; validation split; top-1 and R@1 in % (mean ± sd over seeds). "
             f"`probe`: the image tower trained supervised on shape (lr {PROBE_LR}, batch {args.probe_batch}). "
             "CLIP arms: CLIP's loss only, one suspect changed against `clip` (overrides in the script's ARMS). Wall "
             "times are comparable only between runs that had the machine alone.", "",
             "| arm | seeds | colour | shape | colour+shape | i2t R@1 | t2i R@1 | wall s |", "|---|---|---|---|---|---|---|---|"]
    for arm, e in table.items():
        cells = [f"{100 * e[f'{k}_mean']:.1f} ± {100 * e[f'{k}_sd']:.1f}" if f"{k}_mean" in e else "-"
                 for k in METRICS]
        lines.append(f"| {arm} | {e['seeds']} | " + " | ".join(cells) + f" | {e['wall_time_s_mean']:.0f} |")
    replace_section("\n".join(lines) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=[*PROBES, *ARMS], choices=[*PROBES, *ARMS])
    parser.add_argument("--probe-batch", type=int, default=128)
    parser.add_argument("--collect", action="store_true", help="publish the finished runs without training more")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "shape-learning-runs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.work)
    for seed in args.seeds:
        for arm in args.arms:
            done = args.work / f"{arm}-seed{seed}-steps{args.steps}.json"
            if not done.exists() and not args.collect:
                with tempfile.TemporaryDirectory() as tmp:
                    row = (probe_run(arm, seed, args.steps, data, args.probe_batch) if arm in PROBES
                           else clip_run(arm, seed, args.steps, data, Path(tmp)))
                done.write_text(json.dumps(row) + "\n")
                print(f"{arm} seed {seed}: {json.dumps(row)}", flush=True)
    # the table always holds every kept run at this step count, whichever arms and seeds this call ran
    runs: dict[str, list[dict[str, float]]] = {}
    seeds: set[int] = set()
    for arm in [*PROBES, *ARMS]:
        for done in sorted(args.work.glob(f"{arm}-seed*-steps{args.steps}.json")):
            runs.setdefault(arm, []).append(json.loads(done.read_text()))
            seeds.add(int(done.name[len(arm) + len("-seed"):].split("-")[0]))
    args.seeds = sorted(seeds)
    table = summarise(runs)
    write_section(table, args)
    if "clip" not in table:
        sys.exit("no kept run of the `clip` arm at this step count: nothing to compare with")
    clip_shape = table["clip"]["shape_mean"]
    best = max((a for a in table if a not in PROBES), key=lambda a: table[a]["colour_shape_mean"])
    probes = ", ".join(f"{a} {100 * table[a]['shape_mean']:.1f}%" for a in table if a in PROBES)
    publish("shape_learning", {"steps": args.steps, "seeds": args.seeds, "table": table},
            measured=f"best CLIP arm {best}: shape {100 * table[best]['shape_mean']:.1f}%, colour+shape "
                     f"{100 * table[best]['colour_shape_mean']:.1f}%; supervised probes' shape: {probes}",
            reference=f"CLIP at lr 1e-3 cosine: shape {100 * clip_shape:.1f}%",
            ratio=table[best]["shape_mean"] / clip_shape,
            command=f"python benchmarks/shape_learning.py --steps {args.steps} --seeds "
                    f"{' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
