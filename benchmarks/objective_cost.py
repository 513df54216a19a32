"""Issue #16 item 4: what LightCLIP's three objectives cost per training step, with and without distillation.

The four headline arms of `distill_screens.py` (plain CLIP, the objectives alone, distillation alone: the default,
both) are built side by side in one process as the trainer builds them (`build_model`, `build_objectives`,
`TrainingLoss`, `build_optimizer`, channels-last images, trimmed captions), from `params.yaml` plus the arm's
overrides, and take their optimizer steps in turn on the same batches of the committed stored views
(`artifacts/reinforced/train`): at every step each arm does zero_grad, forward, backward, gradient clipping and the
AdamW step on that step's batch, the order rotating from step to step. A pair's figure is the median over steps of
the two arms' time ratio on the same batch, seconds apart, so that the drift of a shared machine cancels (the
earlier design, a 10-step `train()` run per arm and round, moved the same ratio by +-0.1 between rounds and days).
Loading and decoding batches is outside the timing: it is the same for every arm. The first `--warmup` steps are
left out. #16's target: `lightclip_no_distill` / `plain_clip` <= 1.20.

    python benchmarks/objective_cost.py [--steps 30] [--warmup 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_screens  # noqa: E402
from common import publish  # noqa: E402

from lightclip_core.losses.objective import TrainingLoss, build_objectives  # noqa: E402
from lightclip_core.models import build_model  # noqa: E402
from lightclip_core.models.tokenizer import trim_padding  # noqa: E402
from lightclip_core.train.data import EXTRA_KEYS, make_loader, reinforcement_of  # noqa: E402
from lightclip_core.train.trainer import build_optimizer, plan_steps  # noqa: E402

ARMS = ("plain_clip", "lightclip_no_distill", "distill_only", "lightclip_distill")
PAIRS = {"objectives_over_clip": ("lightclip_no_distill", "plain_clip"),
         "objectives_over_distillation": ("lightclip_distill", "distill_only"),
         "distillation_over_clip": ("distill_only", "plain_clip")}


class Arm:
    """One arm's model, objectives and optimizer, built as the trainer builds them; `step` times one optimizer step."""

    def __init__(self, name: str):
        self.cfg = cfg = distill_screens.arm_config(name, 0)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model.visual.to(memory_format=self.memory_format)
        objectives = build_objectives(cfg, model, reinforcement_of(distill_screens.TRAIN))
        self.loss = TrainingLoss(model, objectives).train()
        self.optimizer = build_optimizer(model, cfg, objectives)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, batch: dict[str, torch.Tensor], step: int, total_steps: int) -> float:
        images = batch["images"].contiguous(memory_format=self.memory_format)
        extras = {k: batch[k] for k in EXTRA_KEYS if k in batch}
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = self.loss(images, batch["tokens"], step, total_steps, extras)
        loss.backward()
        if self.cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(self.parameters, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.loss.after_step()
        return time.perf_counter() - start


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over steps of the per-step time ratio (the same batch, seconds apart)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps}: more than --warmup={args.warmup} steps are needed")
    if not (distill_screens.TRAIN / "manifest.json").exists():
        sys.exit(f"no reinforced split at {distill_screens.TRAIN}: run `dvc repro reinforce` first")
    arms = {name: Arm(name) for name in ARMS}
    cfg = arms["distill_only"].cfg  # its batches carry the stored views and every teacher embedding
    loader, _ = make_loader(cfg, distill_screens.TRAIN)
    total = plan_steps(cfg, json.loads((distill_screens.TRAIN / "manifest.json").read_text())["num_samples"])[1]
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    batches = iter(loader)
    for step in range(args.steps):
        batch = next(batches)
        batch["tokens"] = trim_padding(batch["tokens"])
        order = ARMS[step % len(ARMS):] + ARMS[:step % len(ARMS)]
        for name in order:
            seconds = arms[name].step(batch, step, total)
            if step >= args.warmup:
                times[name].append(seconds)
        if step >= args.warmup and (step + 1) % 10 == 0:
            print(f"step {step + 1}: " + ", ".join(f"{a} {statistics.median(t):.3f} s" for a, t in times.items()),
                  flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: paired_ratio(times[a], times[b]) for name, (a, b) in PAIRS.items()}
    publish("objective_cost", {"seconds": times, "median_s": median, "ratios": ratios, "design": "paired steps",
                               "views": distill_screens.views_key()},
            measured=f"LightCLIP's objectives: {median['lightclip_no_distill']:.2f} s/step without distillation, "
                     f"{median['lightclip_distill']:.2f} s with it (paired per-step ratios)",
            reference=f"plain CLIP {median['plain_clip']:.2f} s, distillation alone {median['distill_only']:.2f} s",
            ratio=ratios["objectives_over_clip"],
            command=f"python benchmarks/objective_cost.py --steps {args.steps} --warmup {args.warmup}")


if __name__ == "__main__":
    main()
