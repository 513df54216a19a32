"""Where the pipeline's heavy stages spend their time on a CPU, and what issue #15's speed work saves: each stage's hot
step in its stock form (the code before it) against its current form, alternated over rounds in one process.

- teacher_pretrain: one supervised step of the teacher's ResNet-18 tower (a linear head per label, batch 128, 64 px).
  Stock: channels-first images, torch's default AdamW (on CPU tensors the single-tensor loop); current: channels-last,
  fused AdamW (lightclip_core.train.optim).
- teacher_clip: one step of the teacher's contrastive + captioning phase, tower locked (the trained teacher and
  captioning decoder of artifacts/teacher, 128 training pairs). Stock: channels-first, single-tensor AdamW, captions
  padded to the context length; current: channels-last, fused, padding trimmed (exact: tests/test_teachers.py).
- reinforce: `ShardReinforcer.chunk` on 256 training samples (2 views, 1 synthetic caption each, as params.yaml).
  Stock: channels-first teachers, sampling over the tokenizer's 49408 ids, padded captions; current: channels-last,
  sampling over the decoder's own vocabulary (the same distribution), trimmed captions.
- train: a step of the student (`lightclip_core.train.trainer.train` on artifacts/reinforced/train, params.yaml):
  single-tensor against fused AdamW, the one change there.

Ratio: stock median / current median (above 1: faster now). Needs `dvc repro reinforce` first.

    python benchmarks/stage_speed.py --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, publish, train_step_times  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.shards import decode_image, iter_raw_samples, shard_refs  # noqa: E402
from lightclip_core.reinforce import captioner as captioner_module  # noqa: E402
from lightclip_core.reinforce import coca_teacher as ct  # noqa: E402
from lightclip_core.reinforce import teachers as teachers_module  # noqa: E402
from lightclip_core.reinforce import tower_pretrain  # noqa: E402
from lightclip_core.reinforce.caption_decoder import TowerCaptioner  # noqa: E402
from lightclip_core.reinforce.reinforcement import ShardReinforcer, Timer, default_specs  # noqa: E402
from lightclip_core.train import trainer  # noqa: E402

UNITS = {"teacher_pretrain": "step", "teacher_clip": "step", "reinforce": "256 samples", "train": "step"}
DATA = ROOT / "artifacts" / "data" / "train"
TEACHER = ROOT / "artifacts" / "teacher"
REINFORCED = ROOT / "artifacts" / "reinforced" / "train"
BATCH = 128


def _stock_adamw(params, **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def _padded_encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    return model.encode_text(tokens, normalize=normalize)


def _over_tokenizer_ids(sample_sequences: Callable) -> Callable:
    """sample_sequences as it was called: over the tokenizer's ids (the captioner's step then gives them, see
    Reinforce.patches), without a reduced vocabulary's mapping."""
    def stock(step, n, device, sot, eot, max_tokens, top_p, temperature, generator, token_ids=None):
        return sample_sequences(step, n, device, sot, eot, max_tokens, top_p, temperature, generator)
    return stock


@contextlib.contextmanager
def stock_code(models: list[nn.Module], own_patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """The code before the speed work: module attributes (and a part's `own_patches`) swapped back, `models` in
    channels-first layout."""
    patches = [(m, "IMAGE_LAYOUT", torch.contiguous_format)
               for m in (teachers_module, captioner_module, ct, tower_pretrain)]
    patches += [(m, "adamw", _stock_adamw) for m in (ct, tower_pretrain, trainer)]
    patches += [(m, "encode_text", _padded_encode_text) for m in (teachers_module, ct)]
    patches += [(ct, "trim_padding", lambda tokens: tokens),
                (captioner_module, "sample_sequences", _over_tokenizer_ids(captioner_module.sample_sequences)),
                *own_patches]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for m, name, value in patches:
        setattr(m, name, value)
    for model in models:
        model.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
        for model in models:
            model.to(memory_format=teachers_module.IMAGE_LAYOUT)


def _timed(fn: Callable[[], None], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


class TeacherPretrain:
    """The supervised tower step of lightclip_core.reinforce.tower_pretrain on random 64 px images."""

    def __init__(self):
        torch.manual_seed(0)
        self.trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)
        self.trunk.to(memory_format=torch.channels_last)
        self.heads = nn.ModuleList(nn.Linear(self.trunk.num_features, k) for k in (6, 8, 2, 3))
        self.images = torch.randn(BATCH, 3, 64, 64)
        self.labels = torch.stack([torch.randint(0, k, (BATCH,)) for k in (6, 8, 2, 3)], dim=1)
        self.models, self.patches = [self.trunk], []

    def run(self, repeats: int) -> list[float]:
        optimizer = tower_pretrain.adamw(nn.ModuleList([self.trunk, self.heads]).parameters(), lr=1e-4)
        images = self.images.contiguous(memory_format=tower_pretrain.IMAGE_LAYOUT)

        def step():
            features = self.trunk(images)
            loss = sum(F.cross_entropy(h(features), self.labels[:, i]) for i, h in enumerate(self.heads))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        step()  # the optimizer's state
        return _timed(step, repeats)


class TeacherClip:
    """One step of the teacher's locked-tower phase (coca_teacher._step) on the trained teacher and decoder."""

    def __init__(self, cfg):
        c = cfg.teacher.train
        self.c = c
        self.model = open_clip.create_model(f"local-dir:{TEACHER / 'model'}")
        self.model.visual.lock(unlocked_groups=0, freeze_bn_stats=False)
        self.model.to(memory_format=torch.channels_last).train()
        self.model.visual.trunk.eval()
        self.decoder = ct.build_decoder(c, self.model, DATA)
        loader, _ = ct._loader(c, DATA, cfg.model.image.mean, cfg.model.image.std, torch.device("cpu"))
        self.batch = next(iter(loader))
        self.models, self.patches = [self.model], []

    def run(self, repeats: int) -> list[float]:
        trained = nn.ModuleDict({"model": self.model, "decoder": self.decoder})
        optimizer = ct.build_optimizer(trained, self.c)
        images = self.batch["images"].contiguous(memory_format=ct.IMAGE_LAYOUT)

        def step():
            loss = ct._step(self.model, ClipLoss(), images, self.batch["tokens"], self.decoder)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        step()
        return _timed(step, repeats)


class Reinforce:
    """ShardReinforcer.chunk on 256 training samples with the trained teacher and captioner."""

    def __init__(self, cfg, cache: Path):
        specs, captioner_spec = default_specs(cfg, TEACHER)
        self.ensemble = teachers_module.TeacherEnsemble(specs, cache)
        self.captioner = captioner_module.Captioner(captioner_spec, cache)
        self.worker = ShardReinforcer(cfg, self.ensemble, self.captioner, Timer())
        self.raws = []
        for raw in iter_raw_samples(shard_refs(DATA)):
            self.raws.append(raw)
            if len(self.raws) == 2 * BATCH:
                break
        self.images = [decode_image(raw) for raw in self.raws]
        self.models = [t.model for t in self.ensemble.teachers] + [self.captioner.decoder_model.trunk]
        # stock: each sampling step scores the tokenizer's 49408 ids, through TowerCaptioner.next_logits itself (on a
        # view of the decoder whose next_reduced_logits is the unpatched one)
        decoder = self.captioner.decoder_model
        unpatched = SimpleNamespace(next_reduced_logits=decoder.next_reduced_logits, decoder=decoder.decoder)
        self.patches = [(decoder, "next_reduced_logits",
                         lambda prefix, memory: TowerCaptioner.next_logits(unpatched, prefix, memory))]

    def run(self, repeats: int) -> list[float]:
        return _timed(lambda: self.worker.chunk(self.raws, self.images, torch.Generator().manual_seed(0)), repeats)


class Train:
    """Steps of the student's training (median step time of the train log, the first two steps left out)."""

    def __init__(self, steps: int):
        self.cfg = load_config(ROOT / "params.yaml", [f"train.max_steps={steps}", "train.resume=false",
                                                      "train.checkpoint_every=100000", "tracking.enabled=false"])
        self.models: list[nn.Module] = []
        self.patches: list = []

    def run(self, repeats: int) -> list[float]:
        return train_step_times(self.cfg, REINFORCED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="steps per round of the teacher and reinforce parts")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["teacher_pretrain", "teacher_clip", "reinforce", "train"])
    args = parser.parse_args()
    if not (REINFORCED / "manifest.json").exists() or not (TEACHER / "model").is_dir():
        sys.exit("no artifacts/teacher or artifacts/reinforced/train: run `dvc repro reinforce` first")
    cfg = load_config(ROOT / "params.yaml")
    cache = Path(tempfile.mkdtemp(prefix="stage-speed-"))
    makers = {"teacher_pretrain": TeacherPretrain, "teacher_clip": lambda: TeacherClip(cfg),
              "reinforce": lambda: Reinforce(cfg, cache), "train": lambda: Train(args.train_steps)}
    parts = {name: makers[name]() for name in args.parts}
    times: dict[str, dict[str, list[float]]] = {name: {"stock": [], "current": []} for name in parts}
    for r in range(args.rounds):
        for name, part in parts.items():
            for arm in (("stock", "current") if r % 2 == 0 else ("current", "stock")):
                with stock_code(part.models, part.patches) if arm == "stock" else contextlib.nullcontext():
                    times[name][arm] += part.run(args.repeats)
            print(f"round {r} {name}: " + ", ".join(f"{a} {statistics.median(t):.3f} s" for a, t in
                                                    times[name].items()), flush=True)
    command = "python benchmarks/stage_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items())
    for name, arms in times.items():
        stock, current = statistics.median(arms["stock"]), statistics.median(arms["current"])
        publish(f"stage_speed_{name}", {"seconds": arms, "stock_median_s": stock, "current_median_s": current},
                measured=f"current: {current:.3f} s per {UNITS[name]}",
                reference=f"stock (before the speed work): {stock:.3f} s", ratio=stock / current, command=command)


if __name__ == "__main__":
    main()
