"""Export stage: a training checkpoint becomes a self-contained inference model directory.

The checkpoint's model is reparameterized (train-time branches folded, :mod:`lightclip_core.export.reparam`) and
stripped of the modules no encoder reads (:mod:`lightclip_core.export.prune`). `out_dir` then receives
`model.safetensors` (the folded weights), `config.json` (everything needed to rebuild that model and to preprocess
its inputs, see :mod:`lightclip_core.export.load`), the tokenizer's vocabulary file, one `torch.export` program
per encoder (`*.pt2`) and, when `export.onnx` is set, one ONNX file per encoder; both formats have a dynamic batch
axis. `parity.json` reports, per encoder and at two batch sizes, how far the folded model is from the trained one
and each format from the folded model; the stage fails past `export.parity_tolerance`. A run started from weights
(`model.init_from`) is exported at `export.wise_ft_alpha` between them and its fine-tuned weights, with both
endpoints kept for other alphas (:mod:`lightclip_core.export.wise_ft`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import save_model
from torch import nn
from torch.export import ExportedProgram

from lightclip_core.config import Config, ConfigError, ExportConfig, ModelConfig
from lightclip_core.export.format import (CONFIG_FILE, ENCODER_INPUTS, FORMAT_VERSION, ONNX_FILES, ONNX_INPUTS,
                                          ONNX_OUTPUT, PARITY_FILE, PROGRAM_FILES, TOKENIZER_VOCAB_FILE, WEIGHTS_FILE,
                                          WISE_FT_FILE)
from lightclip_core.export.prune import drop_modules, unreachable_modules
from lightclip_core.export.reparam import parameter_count, reparameterize
from lightclip_core.export.wise_ft import WISE_FT_KEY, interpolate_state, write_endpoints
from lightclip_core.infra.storage import atomic_path, sha256_file, write_json_atomic
from lightclip_core.models.clip import CLIP, build_model
from lightclip_core.models.open_clip_student import write_open_clip_dir
from lightclip_core.models.tokenizer import tokenize, tokenizer_spec, vocab_file
from lightclip_core.train.checkpoint import load_checkpoint
from lightclip_core.train.start import START_KEY

log = logging.getLogger(__name__)

# Real captions of varied length, so the end-of-text position (the pooled token) differs across the batch.
PARITY_CAPTIONS = (
    "a photo of a red circle.",
    "a small blue square in the top left corner of a grey background",
    "two green triangles",
    "an image of a large yellow star next to a purple hexagon on a white background, slightly blurred",
    "cat",
    "a picture showing an orange ellipse at the bottom.",
)

Runner = Callable[[torch.Tensor], np.ndarray]  # one encoder: input batch -> embeddings
Parity = dict[str, dict[str, float]]  # encoder -> "batch_<n>" -> max abs difference


class ExportParityError(RuntimeError):
    """An exported format (or the folded model) disagrees with its reference by more than the tolerance."""


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    parity: dict[str, Parity] = field(default_factory=dict)  # "reparameterized" | "torch_export" | "onnx" -> ...
    param_count: int = 0
    param_count_unfused: int = 0


class ImageEncoder(nn.Module):
    """`image [B, 3, H, W] -> embedding [B, D]` (L2-normalised), holding the image tower only."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual  # named as in CLIP, so program tensors have CLIP's names

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(image), dim=-1)


class TextEncoder(nn.Module):
    """`text [B, L] int64 -> embedding [B, D]` (L2-normalised), holding the text tower only."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.text = model.text

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(text), dim=-1)


def encoders(model: CLIP) -> dict[str, nn.Module]:
    return {"image_encoder": ImageEncoder(model).eval(), "text_encoder": TextEncoder(model).eval()}


# ------------------------------------------------------------------------------------------------ model
def model_from_checkpoint(checkpoint: str | os.PathLike) -> tuple[CLIP, dict[str, Any]]:
    """The model of a training checkpoint, weights loaded strictly, in eval mode; also the checkpoint dict."""
    ckpt = load_checkpoint(checkpoint)
    missing = [k for k in ("model", "model_config") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(checkpoint)!r} lacks {missing}; expected a final checkpoint of `train`")
    try:
        model_cfg = ModelConfig.model_validate(ckpt["model_config"])
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"checkpoint {str(checkpoint)!r}: model_config.{where}: {first['msg']}") from None
    model = build_model(model_cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval(), ckpt


def export_metadata(model: CLIP, step: int | None, param_count_unfused: int, dropped: list[str]) -> dict[str, Any]:
    """The content of `config.json`: how to rebuild the model, and how to turn images and texts into its inputs."""
    cfg = model.cfg
    return {
        "format_version": FORMAT_VERSION,
        "model_config": cfg.architecture(),
        "reparameterized": True,  # the loader folds the freshly built model before loading these weights
        "dropped_modules": dropped,
        "embed_dim": cfg.embed_dim,
        "param_count": parameter_count(model),
        "param_count_unfused": param_count_unfused,
        "preprocess": {
            "size": cfg.image.size,
            "interpolation": cfg.image.interpolation,
            "mean": list(cfg.image.mean),
            "std": list(cfg.image.std),
            "resize_mode": "shortest",  # resize the shorter side to `size` (antialiased), then centre-crop
            "input": "RGB, scaled to [0, 1], then (x - mean) / std, NCHW float32",
        },
        "tokenizer": {**tokenizer_spec(cfg.text.context_length), "vocab_file": TOKENIZER_VOCAB_FILE,
                      "vocab_sha256": sha256_file(vocab_file())},
        "source": {"checkpoint_step": step},
        "files": {"weights": WEIGHTS_FILE, "tokenizer_vocab": TOKENIZER_VOCAB_FILE},
    }


def write_weights(model: nn.Module, path: Path) -> None:
    # save_model (unlike save_file) drops the aliases of shared tensors; load_model restores them.
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)


def wise_ft_start(cfg: Config, ckpt: dict[str, Any], checkpoint: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The checkpoint's start weights (`start_model`, a run with `model.init_from`), None without them; a
    ConfigError when `export.wise_ft_alpha` asks to interpolate towards start weights the checkpoint has not."""
    start = ckpt.get(START_KEY)
    if start is None and cfg.export.wise_ft_alpha != 1:
        raise ConfigError(f"export.wise_ft_alpha={cfg.export.wise_ft_alpha:g}: the checkpoint {str(checkpoint)!r} "
                          f"has no start weights (its run was not started from weights, model.init_from); allowed: "
                          f"1.0 for it")
    return start


# ------------------------------------------------------------------------------------------------ parity
def parity_inputs(model: CLIP, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images drawn uniformly in pixel space then normalised as in preprocessing, and tokenised captions."""
    image_cfg = model.cfg.image
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, image_cfg.size, image_cfg.size, generator=gen)
    mean = torch.tensor(image_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(image_cfg.std).view(1, 3, 1, 1)
    captions = [PARITY_CAPTIONS[i % len(PARITY_CAPTIONS)] for i in range(batch)]
    return {"image": (pixels - mean) / std, "text": tokenize(captions, model.cfg.text.context_length)}


def module_runner(module: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).numpy()
    return run


def pytorch_runners(model: CLIP) -> dict[str, Runner]:
    return {name: module_runner(module) for name, module in encoders(model).items()}


def program_runners(files: dict[str, Path]) -> dict[str, Runner]:
    """Runners of the saved `torch.export` programs, loaded back from disk."""
    return {name: module_runner(torch.export.load(str(path)).module()) for name, path in files.items()}


def onnx_runners(files: dict[str, Path]) -> dict[str, Runner]:
    import onnxruntime as ort

    def runner(path: Path, input_name: str) -> Runner:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run([ONNX_OUTPUT], {input_name: x.numpy()})[0]

    return {name: runner(path, ONNX_INPUTS[name]) for name, path in files.items()}


def reference_outputs(runners: dict[str, Runner], inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, np.ndarray]]:
    """Each encoder's embeddings of the parity inputs at the full batch and at batch 1."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, run in runners.items():
        x = inputs[ENCODER_INPUTS[name]]
        out[name] = {size: run(x[:size]) for size in (x.shape[0], 1)}
    return out


def measure_parity(reference: dict[str, dict[int, np.ndarray]], runners: dict[str, Runner],
                   inputs: dict[str, torch.Tensor]) -> Parity:
    """Max abs difference of each runner's embeddings from the reference's, per encoder and batch size."""
    parity: Parity = {}
    for name, run in runners.items():
        x = inputs[ENCODER_INPUTS[name]]
        parity[name] = {}
        for size, expected in reference[name].items():
            got = run(x[:size])
            if got.shape != expected.shape:
                raise ExportParityError(f"{name}: output shape {got.shape} != reference {expected.shape}")
            parity[name][f"batch_{size}"] = float(np.abs(got - expected).max())
    return parity


def check_parity(parity: dict[str, Parity], tolerance: float) -> None:
    """Raise :class:`ExportParityError` naming the worst format/encoder/batch if it exceeds `tolerance`."""
    # `not diff <= tolerance` also catches NaN, which every comparison (and so `max`) would let through.
    failures = [(fmt, enc, b, diff) for fmt, per_encoder in parity.items() for enc, per in per_encoder.items()
                for b, diff in per.items() if not diff <= tolerance]
    if failures:
        fmt, enc, b, diff = max(failures, key=lambda f: np.inf if np.isnan(f[3]) else f[3])
        raise ExportParityError(f"{fmt} parity failed: {enc} at {b} differs from its reference by {diff:.3g} "
                                f"(export.parity_tolerance={tolerance:g}); see {PARITY_FILE}")


# ------------------------------------------------------------------------------------------------ formats
def export_program(module: nn.Module, example: torch.Tensor) -> ExportedProgram:
    """`torch.export` of `module(input) -> embedding` with a dynamic batch axis."""
    if example.shape[0] < 2:  # torch.export specialises a dimension of size 1 instead of keeping it dynamic
        raise ValueError(f"the example batch for export needs at least two rows, got {example.shape[0]}")
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def save_program(program: ExportedProgram, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: save() wants a `.pt2` name otherwise
        torch.export.save(program, f)


def _name_graph_output(graph: Any, name: str) -> None:
    """Call the (single) graph output `name`. The dynamo exporter names values after the aten ops that produce
    them, so `output_names=["embedding"]` collides with the output of `aten.embedding` and yields an invalid
    model (pytorch/pytorch#158094); rename any other value holding the name first."""
    output = graph.outputs[0]
    values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
    for value in values:
        if value.name == name and value is not output:
            value.name = f"{name}__inner"
    output.name = name


def export_onnx(program: ExportedProgram, input_name: str, path: Path, opset: int) -> None:
    """Translate an exported program (dynamic batch already in it) to ONNX with the dynamo exporter."""
    onnx_program = torch.onnx.export(program, input_names=[input_name], opset_version=opset, dynamo=True,
                                     verbose=False)
    _name_graph_output(onnx_program.model.graph, ONNX_OUTPUT)
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp), external_data=False)


def export_programs(model: CLIP, inputs: dict[str, torch.Tensor]) -> dict[str, ExportedProgram]:
    return {name: export_program(module, inputs[ENCODER_INPUTS[name]]) for name, module in encoders(model).items()}


def inference_model(model: CLIP, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, ExportedProgram], list[str]]:
    """Reparameterize `model` in place and drop the modules its encoders never read; return the encoders' programs
    (of the final model) and the dropped module names."""
    reparameterize(model)
    programs = export_programs(model, inputs)
    dropped = unreachable_modules(model, programs.values())
    if dropped:
        drop_modules(model, dropped)
        programs = export_programs(model, inputs)  # the programs held the dropped tensors as unused inputs
    return programs, dropped


def write_formats(model: CLIP, programs: dict[str, ExportedProgram], out_dir: Path, export_cfg: ExportConfig,
                  inputs: dict[str, torch.Tensor]) -> tuple[dict[str, Path], dict[str, Parity]]:
    """Write the `.pt2` programs (and ONNX encoders) and measure each against the PyTorch model."""
    reference = reference_outputs(pytorch_runners(model), inputs)
    program_files = {name: out_dir / fname for name, fname in PROGRAM_FILES.items()}
    for name, path in program_files.items():
        save_program(programs[name], path)
    parity = {"torch_export": measure_parity(reference, program_runners(program_files), inputs)}
    files = {path.name: path for path in program_files.values()}
    if export_cfg.onnx:
        onnx_files = {name: out_dir / fname for name, fname in ONNX_FILES.items()}
        for name, path in onnx_files.items():
            export_onnx(programs[name], ENCODER_INPUTS[name], path, export_cfg.opset)
        parity["onnx"] = measure_parity(reference, onnx_runners(onnx_files), inputs)
        files.update({path.name: path for path in onnx_files.values()})
    return files, parity


# ------------------------------------------------------------------------------------------------ stage
def export(cfg: Config, checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> ExportResult:
    """Export the final training checkpoint to `out_dir` (see the module docstring). `config.json` is written
    last, only when every parity check passes: a failed export is never loadable."""
    out_dir = Path(out_dir)
    model, ckpt = model_from_checkpoint(checkpoint)
    start = wise_ft_start(cfg, ckpt, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.cfg.architecture() != cfg.model.architecture():
        # The checkpoint is what was trained; params.yaml may have moved on since.
        log.warning("model config in %s differs from params.yaml's `model`; exporting the checkpoint's", checkpoint)
    if start is not None:  # WiSE-FT: every check below is on the interpolated model
        model.load_state_dict(interpolate_state(start, ckpt["model"], cfg.export.wise_ft_alpha), strict=True)
    # an open_clip student's training-time weights, kept before folding for its open_clip local-dir files
    unfolded = ({name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
                if model.cfg.open_clip is not None else {})
    inputs = parity_inputs(model, cfg.export.parity_batch)
    trained = reference_outputs(pytorch_runners(model), inputs)
    param_count_unfused = parameter_count(model)
    programs, dropped = inference_model(model, inputs)
    parity = {"reparameterized": measure_parity(trained, pytorch_runners(model), inputs)}

    files = {"weights": out_dir / WEIGHTS_FILE, "tokenizer_vocab": out_dir / TOKENIZER_VOCAB_FILE}
    write_weights(model, files["weights"])
    if start is not None:
        files["wise_ft_endpoints"] = out_dir / WISE_FT_FILE
        write_endpoints(files["wise_ft_endpoints"], start, ckpt["model"])
    with atomic_path(files["tokenizer_vocab"]) as tmp:
        shutil.copyfile(vocab_file(), tmp)
    format_files, format_parity = write_formats(model, programs, out_dir, cfg.export, inputs)
    files.update(format_files)
    parity.update(format_parity)
    files["parity"] = out_dir / PARITY_FILE
    write_json_atomic(files["parity"], {"tolerance": cfg.export.parity_tolerance, "max_abs_diff": parity})
    check_parity(parity, cfg.export.parity_tolerance)
    open_clip_files = write_open_clip_dir(model.cfg, unfolded, out_dir)  # an open_clip student, as open_clip loads it
    files.update(open_clip_files)

    metadata = export_metadata(model, ckpt.get("step"), param_count_unfused, dropped)
    if ckpt.get("lineage"):
        metadata["lineage"] = ckpt["lineage"]  # the training data and parameters, for every report on this model
    metadata["files"].update({f"{name}_program": fname for name, fname in PROGRAM_FILES.items()})
    metadata["files"].update({name: path.name for name, path in open_clip_files.items()})
    if start is not None:
        metadata["files"]["wise_ft_endpoints"] = WISE_FT_FILE
        metadata[WISE_FT_KEY] = {"alpha": cfg.export.wise_ft_alpha, "endpoints": WISE_FT_FILE,
                                 "init_from": (ckpt.get("lineage") or {}).get("init_from")}
    metadata["torch_export"] = {"files": PROGRAM_FILES, "inputs": ENCODER_INPUTS, "dynamic_axes": {"batch": 0},
                                "normalized": True}
    if cfg.export.onnx:
        metadata["files"].update(ONNX_FILES)
        metadata["onnx"] = {"opset": cfg.export.opset, "inputs": ONNX_INPUTS, "output": ONNX_OUTPUT,
                            "dynamic_axes": {"batch": 0}, "normalized": True}
    files["config"] = out_dir / CONFIG_FILE
    write_json_atomic(files["config"], metadata)
    log.info("exported %d parameters (%d before reparameterization, dropped %s) to %s; parity %s",
             metadata["param_count"], param_count_unfused, dropped or "nothing", out_dir, json.dumps(parity))
    return ExportResult(out_dir=out_dir, files=files, parity=parity, param_count=metadata["param_count"],
                        param_count_unfused=param_count_unfused)
