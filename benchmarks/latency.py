"""Inference latency of image and text towers on this CPU: the training-time model (eval mode, branches unfolded),
the reparameterized PyTorch model, and ONNX Runtime on the encoder the export stage writes; at batch 1 and 32.

Each tower is wrapped as the export stage wraps it (tower, projection, L2 normalisation) and run at the input size
of its preset: mobilenetv2_100 at 224 px (lightclip-mnv2-s), mobileone_s0 at 224 px (timm's size; no preset),
fastvit_mci0 at 256 px (mobileclip-s0); text towers on 77-token captions: MobileCLIP-S0's MCt against the 12-layer
transformer of MobileCLIP-S1/S2. Eager PyTorch runs under `inference_mode` (image towers in both memory layouts,
the faster one counts), ONNX Runtime with all graph optimisations; both use every core. BatchNorm statistics come
from a few train-mode passes, as a trained model's would. One row per tower; its ratio is the reparameterization
speed-up at batch 1.

    python benchmarks/latency.py [--runs 20] [--runs-batched 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_after_warmup, publish  # noqa: E402

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightclip_core.config import ModelConfig  # noqa: E402
from lightclip_core.models.tokenizer import tokenize  # noqa: E402
from lightclip_core.export.exporter import (ImageEncoder, TextEncoder, export_onnx, export_program,  # noqa: E402
                                            parity_inputs)
from lightclip_core.export.reparam import parameter_count, reparameterize  # noqa: E402
from lightclip_core.models.clip import CLIP  # noqa: E402

BATCHES = (1, 32)
WARMUP = 2
# tower name -> (model config, which encoder)
TOWERS: dict[str, tuple[dict, str]] = {
    "mobilenetv2_100": ({"preset": "lightclip-mnv2-s"}, "image"),
    "mobileone_s0": ({"preset": "lightclip-mnv2-s", "image": {"tower": "mobileone_s0"}}, "image"),
    "fastvit_mci0": ({"preset": "mobileclip-s0"}, "image"),
    "text_mct": ({"preset": "mobileclip-s0"}, "text"),
    "text_transformer12": ({"preset": "mobileclip-s1"}, "text"),
}
CAPTIONS = ("a photo of a dog playing with a red ball in the park", "a diagram",
            "two people riding bicycles on a mountain road at sunset, with snow on the peaks behind them")


def example_input(model: CLIP, kind: str, batch: int) -> torch.Tensor:
    if kind == "image":
        return torch.rand(batch, 3, model.cfg.image.size, model.cfg.image.size)
    return tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], model.cfg.text.context_length)


def median_seconds(run: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs + WARMUP):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return median_after_warmup(times, WARMUP)


def eager_ms(encoder: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Median ms of eager PyTorch per memory layout: image towers run channels-first and channels-last (the
    faster one depends on tower and batch), text towers as they are."""
    layouts = {"contiguous": torch.contiguous_format}
    if x.ndim == 4:
        layouts["channels_last"] = torch.channels_last
    out = {}
    for layout, memory_format in layouts.items():
        encoder.to(memory_format=memory_format)
        xx = x.contiguous(memory_format=memory_format)

        def run(xx: torch.Tensor = xx) -> object:
            with torch.inference_mode():
                return encoder(xx)

        out[layout] = median_seconds(run, runs) * 1e3
    encoder.to(memory_format=torch.contiguous_format)
    return out


def onnx_session(encoder: nn.Module, example: torch.Tensor, kind: str, workdir: Path) -> ort.InferenceSession:
    path = workdir / f"{kind}.onnx"
    export_onnx(export_program(encoder, example), kind, path, opset=18)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def calibrate_batchnorm(model: CLIP, passes: int = 2, batch: int = 4) -> CLIP:
    """BatchNorm running statistics from a few train-mode passes on random inputs, so that activations stay in
    range as in a trained model (with fresh statistics some timm towers grow them to 1e16 in eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the passes
    model.train()
    for _ in range(passes):
        model.encode_image(example_input(model, "image", batch))
        model.encode_text(example_input(model, "text", batch))
    return model.eval()


def measure_tower(name: str, overrides: dict, kind: str, runs: dict[int, int], workdir: Path) -> dict:
    torch.manual_seed(0)
    model = calibrate_batchnorm(CLIP(ModelConfig.model_validate(overrides)))
    wrap = ImageEncoder if kind == "image" else TextEncoder
    unfolded = wrap(model).eval()
    folded = wrap(reparameterize(copy.deepcopy(model))).eval()
    session = onnx_session(folded, parity_inputs(model, 2)[kind], kind, workdir)
    result: dict = {"kind": kind, "input": list(example_input(model, kind, 1).shape[1:]),
                    "params_unfused": parameter_count(unfolded), "params_reparameterized": parameter_count(folded)}
    for batch in BATCHES:
        x = example_input(model, kind, batch)
        with torch.inference_mode():
            drift = float((folded(x) - unfolded(x)).abs().max())
        feed = {kind: x.numpy()}
        layouts = {"train_model": eager_ms(unfolded, x, runs[batch]),
                   "reparameterized": eager_ms(folded, x, runs[batch])}
        ms = {name: min(per_layout.values()) for name, per_layout in layouts.items()}  # the better layout of each
        ms["onnxruntime"] = median_seconds(lambda feed=feed: session.run(None, feed), runs[batch]) * 1e3
        result[f"batch_{batch}"] = {"ms": ms, "eager_ms_per_layout": layouts,
                                    "reparam_speedup": ms["train_model"] / ms["reparameterized"],
                                    "ort_vs_reparameterized": ms["reparameterized"] / ms["onnxruntime"],
                                    "ort_vs_train_model": ms["train_model"] / ms["onnxruntime"],
                                    "max_abs_diff_reparameterized": drift}
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    return result


def summary(result: dict) -> str:
    parts = []
    for batch in BATCHES:
        ms = result[f"batch_{batch}"]["ms"]
        parts.append(f"b{batch}: train-time {ms['train_model']:.1f} ms, reparam {ms['reparameterized']:.1f} ms, "
                     f"ORT {ms['onnxruntime']:.1f} ms")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (after warm-up)")
    parser.add_argument("--runs-batched", type=int, default=5, help="timed runs at batch 32 (after warm-up)")
    parser.add_argument("--towers", nargs="*", default=list(TOWERS), choices=list(TOWERS))
    args = parser.parse_args()
    command = f"python benchmarks/latency.py --runs {args.runs} --runs-batched {args.runs_batched}"
    runs = {1: args.runs, 32: args.runs_batched}
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: measure_tower(name, *TOWERS[name], runs, Path(tmp)) for name in args.towers}
    for name, result in results.items():
        b1 = result["batch_1"]
        publish(f"latency_{name}", {**result, "torch_threads": torch.get_num_threads(),
                                    "onnxruntime": ort.__version__, "runs": runs},
                measured=summary(result), reference="training-time model (eval mode, unfolded), eager PyTorch, b1",
                ratio=b1["reparam_speedup"], command=command)


if __name__ == "__main__":
    main()
