"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the weights
`(1 - alpha) * start + alpha * fine-tuned` of a run that started from weights (`model.init_from`).

The interpolation runs on the unfolded training-time state dicts (BatchNorm running statistics included; integer
buffers such as `num_batches_tracked` are the fine-tuned model's); the result is then folded and pruned as any
export. An export of such a run keeps both endpoints in `wise_ft.safetensors` (`start.<name>`, `finetuned.<name>`)
and records `"wise_ft": {"alpha", "endpoints", "init_from"}` in `config.json`, so that :func:`wise_ft_model` rebuilds
the model at any alpha (the evaluation's robustness curve) without the training checkpoint.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightclip_core.export.load import (ExportedModel, exported_model, fold_as_exported, read_export_config,
                                        training_model)
from lightclip_core.infra.storage import atomic_path
from lightclip_core.train.start import first_difference

ENDPOINTS = ("start", "finetuned")
WISE_FT_KEY = "wise_ft"  # config.json's entry


def interpolate_state(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], alpha: float
                      ) -> dict[str, torch.Tensor]:
    """`(1 - alpha) * start + alpha * end` for every floating tensor of `end` (computed in at least float32, stored
    in `end`'s dtype); every other tensor is `end`'s. At alpha 1 every tensor is `end`'s and at 0 every floating
    one `start`'s, exactly. The two state dicts must have the same names and shapes."""
    if not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"WiSE-FT alpha={alpha}: allowed: a number in [0, 1]")
    problem = first_difference(end, start)
    if problem is not None:
        raise ValueError(f"WiSE-FT endpoints differ: in the start weights {problem}")
    out: dict[str, torch.Tensor] = {}
    for name, e in end.items():
        s = start[name]
        if not e.is_floating_point() or alpha == 1:
            out[name] = e
        elif alpha == 0:
            out[name] = s.to(e.dtype)
        else:
            dtype = torch.promote_types(e.dtype, torch.float32)
            out[name] = ((1 - alpha) * s.to(dtype) + alpha * e.to(dtype)).to(e.dtype)
    return out


def write_endpoints(path: str | os.PathLike, start: Mapping[str, torch.Tensor],
                    finetuned: Mapping[str, torch.Tensor]) -> None:
    """Both unfolded state dicts in one safetensors file (`start.<name>`, `finetuned.<name>`), written atomically.
    Every tensor is stored on its own (shared tensors are copied), so each name loads back strictly."""
    tensors = {f"{prefix}.{name}": tensor.detach().to("cpu").contiguous().clone()
               for prefix, state in zip(ENDPOINTS, (start, finetuned)) for name, tensor in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def read_endpoints(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(start, finetuned)` state dicts from a file written by :func:`write_endpoints`."""
    tensors = load_file(str(path))
    start, finetuned = ({name.removeprefix(f"{prefix}."): t for name, t in tensors.items()
                         if name.startswith(f"{prefix}.")} for prefix in ENDPOINTS)
    return start, finetuned


def has_wise_ft(export_dir: str | os.PathLike) -> bool:
    """Whether the export keeps WiSE-FT endpoints (its run started from weights), so that :func:`wise_ft_model`
    can rebuild it at any alpha."""
    entry = read_export_config(export_dir).get(WISE_FT_KEY)
    return bool(entry) and (Path(export_dir) / entry["endpoints"]).is_file()


def wise_ft_model(export_dir: str | os.PathLike, alpha: float, device: str | torch.device = "cpu") -> ExportedModel:
    """The export's model with the weights `(1 - alpha) * start + alpha * fine-tuned`: the training-time model of
    `config.json` loaded with the interpolated endpoints, folded and pruned as the export was, with the export's
    preprocessing and tokenizer. At the exported alpha it is the exported model."""
    config = read_export_config(export_dir)
    if not has_wise_ft(export_dir):
        raise ValueError(f"{export_dir}: no WiSE-FT endpoints; its model was not trained from start weights "
                         f"(model.init_from)")
    start, finetuned = read_endpoints(Path(export_dir) / config[WISE_FT_KEY]["endpoints"])
    model = training_model(config)
    model.load_state_dict(interpolate_state(start, finetuned, alpha), strict=True)
    return exported_model(fold_as_exported(model, config), export_dir, config, device)
