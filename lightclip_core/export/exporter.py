"""Export stage: a training checkpoint becomes a self-contained model directory.

`out_dir` receives `model.safetensors` (weights), `config.json` (everything needed to rebuild the model and
preprocess its inputs, see :mod:`lightclip_core.export.load`) and, when `export.onnx` is set, one ONNX file per
encoder with a dynamic batch axis, checked against PyTorch in onnxruntime (`parity.json`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import save_model
from torch import nn

from lightclip_core.config import Config, ExportConfig, ModelConfig
from lightclip_core.data.storage import atomic_path, write_json_atomic
from lightclip_core.data.tokenizer import TOKENIZER_NAME, tokenize
from lightclip_core.models.clip import CLIP, model_summary
from lightclip_core.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PARITY_FILE = "parity.json"
ONNX_FILES = {"image_encoder": "image_encoder.onnx", "text_encoder": "text_encoder.onnx"}
ONNX_INPUTS = {"image_encoder": "image", "text_encoder": "text"}
ONNX_OUTPUT = "embedding"

# Real captions of varied length, so the end-of-text position (the pooled token) differs across the batch.
PARITY_CAPTIONS = (
    "a photo of a red circle.",
    "a small blue square in the top left corner of a grey background",
    "two green triangles",
    "an image of a large yellow star next to a purple hexagon on a white background, slightly blurred",
    "cat",
    "a picture showing an orange ellipse at the bottom.",
)


class ExportParityError(RuntimeError):
    """An ONNX encoder disagrees with PyTorch by more than `export.parity_tolerance`."""


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    param_count: int = 0


class ImageEncoder(nn.Module):
    """`image [B, 3, H, W] -> embedding [B, D]` (L2-normalised): the graph exported to ONNX."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class TextEncoder(nn.Module):
    """`text [B, L] int64 -> embedding [B, D]` (L2-normalised): the graph exported to ONNX."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


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
    model = CLIP(model_cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval(), ckpt


def export_metadata(model: CLIP, step: int | None) -> dict[str, Any]:
    """The content of `config.json`."""
    cfg = model.cfg
    return {
        "format_version": FORMAT_VERSION,
        "model_config": cfg.model_dump(mode="json"),
        "embed_dim": cfg.embed_dim,
        "param_count": model_summary(model)["params_total"],
        "preprocess": {
            "size": cfg.image.size,
            "interpolation": cfg.image.interpolation,
            "mean": list(cfg.image.mean),
            "std": list(cfg.image.std),
        },
        "tokenizer": {"name": TOKENIZER_NAME, "context_length": cfg.text.context_length},
        "source": {"checkpoint_step": step},
        "files": {"weights": WEIGHTS_FILE},
    }


def write_weights(model: nn.Module, path: Path) -> None:
    # save_model (unlike save_file) drops the aliases of shared tensors; load_model restores them.
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)


# ------------------------------------------------------------------------------------------------- onnx
def parity_inputs(model: CLIP, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images drawn uniformly in pixel space then normalised as in preprocessing, and tokenised captions."""
    image_cfg = model.cfg.image
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, image_cfg.size, image_cfg.size, generator=gen)
    mean = torch.tensor(image_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(image_cfg.std).view(1, 3, 1, 1)
    captions = [PARITY_CAPTIONS[i % len(PARITY_CAPTIONS)] for i in range(batch)]
    return {"image": (pixels - mean) / std, "text": tokenize(captions, model.cfg.text.context_length)}


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


def export_onnx(module: nn.Module, example: torch.Tensor, input_name: str, path: Path, opset: int) -> None:
    """Export `module(input) -> embedding` with the dynamo exporter and a dynamic batch axis."""
    if example.shape[0] < 2:  # torch.export specialises a dimension of size 1 instead of keeping it dynamic
        raise ValueError(f"the example batch for ONNX export needs at least two rows, got {example.shape[0]}")
    program = torch.onnx.export(
        module.eval(), (example,), input_names=[input_name], opset_version=opset, dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    _name_graph_output(program.model.graph, ONNX_OUTPUT)
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)


def measure_parity(model: CLIP, onnx_files: dict[str, Path], batch: int) -> dict[str, dict[str, float]]:
    """Max abs difference between onnxruntime and PyTorch per encoder, at batch sizes `batch` and 1."""
    import onnxruntime as ort

    encoders = {"image_encoder": ImageEncoder(model).eval(), "text_encoder": TextEncoder(model).eval()}
    inputs = parity_inputs(model, batch)
    parity: dict[str, dict[str, float]] = {}
    for name, path in onnx_files.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = ONNX_INPUTS[name]
        parity[name] = {}
        for size in (batch, 1):
            x = inputs[input_name][:size]
            with torch.inference_mode():
                expected = encoders[name](x).numpy()
            (got,) = session.run([ONNX_OUTPUT], {input_name: x.numpy()})
            if got.shape != expected.shape:
                raise ExportParityError(f"{name}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
            parity[name][f"batch_{size}"] = float(np.abs(got - expected).max())
    return parity


def check_parity(parity: dict[str, dict[str, float]], tolerance: float) -> None:
    """Raise :class:`ExportParityError` naming the worst encoder/batch if it exceeds `tolerance`."""
    # `not diff <= tolerance` also catches NaN, which every comparison (and so `max`) would let through.
    failures = [(enc, b, diff) for enc, per in parity.items() for b, diff in per.items() if not diff <= tolerance]
    if failures:
        enc, b, diff = max(failures, key=lambda f: np.inf if np.isnan(f[2]) else f[2])
        raise ExportParityError(f"ONNX parity failed: {enc} at {b} differs from PyTorch by {diff:.3g} "
                                f"(export.parity_tolerance={tolerance:g}); see {PARITY_FILE}")


def export_and_check_onnx(model: CLIP, out_dir: Path,
                          export_cfg: ExportConfig) -> tuple[dict[str, Path], dict[str, dict[str, float]]]:
    """Write both ONNX encoders and `parity.json`; raise if parity fails (after writing the report)."""
    inputs = parity_inputs(model, export_cfg.parity_batch)
    files = {name: out_dir / fname for name, fname in ONNX_FILES.items()}
    export_onnx(ImageEncoder(model), inputs["image"], "image", files["image_encoder"], export_cfg.opset)
    export_onnx(TextEncoder(model), inputs["text"], "text", files["text_encoder"], export_cfg.opset)
    parity = measure_parity(model, files, export_cfg.parity_batch)
    report = {"tolerance": export_cfg.parity_tolerance, "max_abs_diff": parity}
    write_json_atomic(out_dir / PARITY_FILE, report)
    check_parity(parity, export_cfg.parity_tolerance)
    return {**files, "parity": out_dir / PARITY_FILE}, parity


# ------------------------------------------------------------------------------------------------ stage
def export(cfg: Config, checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> ExportResult:
    """Export the final training checkpoint to `out_dir` (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, ckpt = model_from_checkpoint(checkpoint)
    if model.cfg != cfg.model:
        # The checkpoint is what was trained; params.yaml may have moved on since.
        log.warning("model config in %s differs from params.yaml's `model`; exporting the checkpoint's", checkpoint)
    metadata = export_metadata(model, ckpt.get("step"))
    files = {"weights": out_dir / WEIGHTS_FILE}
    write_weights(model, files["weights"])
    parity: dict[str, dict[str, float]] = {}
    if cfg.export.onnx:
        metadata["files"].update(ONNX_FILES)
        metadata["onnx"] = {"opset": cfg.export.opset, "inputs": ONNX_INPUTS, "output": ONNX_OUTPUT,
                            "dynamic_axes": {"batch": 0}, "normalized": True}
        onnx_files, parity = export_and_check_onnx(model, out_dir, cfg.export)
        files.update(onnx_files)
    files["config"] = out_dir / CONFIG_FILE
    write_json_atomic(files["config"], metadata)
    log.info("exported %d parameters to %s; parity %s", metadata["param_count"], out_dir, json.dumps(parity))
    return ExportResult(out_dir=out_dir, files=files, parity=parity, param_count=metadata["param_count"])
