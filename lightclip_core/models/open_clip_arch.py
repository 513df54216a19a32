"""`model.open_clip`: an open_clip architecture as the student, read from open_clip's own configuration (no weights).

The architecture comes from open_clip's built-in configs (`ViT-B-32`, `MobileCLIP2-S0`, ...), from a `local-dir:PATH`
(`open_clip_config.json`, the layout open_clip and this project's exports write) or, when the machine is online, from
an `hf-hub:` repository's `open_clip_config.json`. Its fields fill the `model` section's nulls, as a preset does:
`embed_dim`, the image size and preprocessing, the text tower's depth, width, heads and context length. A value
params.yaml sets that disagrees with the architecture is refused, naming the field. The student is always built as
open_clip's `CustomTextCLIP` (`custom_text: true`: the text tower is the `text` submodule), so its state dict is
open_clip's own and open_clip loads it back; open_clip's loader converts checkpoints of the other layout.

Supported: text towers over the CLIP BPE vocabulary that this project's tokenizer produces (the OpenAI CLIP family,
MobileCLIP, MobileCLIP2), pooled at a token position. Hugging Face tokenizers or text models and CoCa's class
token are refused with one line.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightclip_core.infra.schema import merge

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth")  # the names open_clip looks for first in a local directory
TOWER = "open_clip"  # `model.image.tower` of an open_clip student: the tower is open_clip's
CLIP_BPE_VOCAB = 49408
POOLING = ("argmax", "eos", "last", "first")
# the model section's fields an open_clip architecture decides; params.yaml may leave them null or repeat them
ARCHITECTURE_FIELDS = (("embed_dim",), ("image", "tower"), ("image", "size"), ("image", "output_stride"),
                       ("text", "kind"), ("text", "context_length"), ("text", "width"), ("text", "heads"),
                       ("text", "layers"), ("text", "mlp_ratio"), ("text", "causal"))


def read_config_file(path: Path) -> dict[str, Any]:
    """An `open_clip_config.json`: `{"model_cfg": ..., "preprocess_cfg": ...}`."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist (a local-dir holds open_clip_config.json and its weights)")
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({type(err).__name__})") from None
    if not isinstance(found, dict) or not isinstance(found.get("model_cfg"), dict):
        raise ValueError(f"{path} has no model_cfg object")
    return found


def local_dir_path(model: str) -> Path:
    location = model[len(LOCAL_DIR):]
    if location.startswith("s3://"):
        raise ValueError("a local-dir must be a local directory (copy the s3:// prefix locally, or give an open_clip "
                         "model name with `pretrained` set to the s3:// checkpoint)")
    return Path(location)


def hub_config(repo: str) -> dict[str, Any]:
    """An `hf-hub:` repository's config, downloaded once into the Hugging Face cache (needs the network)."""
    from huggingface_hub import hf_hub_download

    try:
        return read_config_file(Path(hf_hub_download(repo, CONFIG_FILE)))
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - offline, unknown repository, gated: one line says which
        raise ValueError(f"cannot read {CONFIG_FILE} of {HF_HUB}{repo} ({type(err).__name__}); offline, download the "
                         f"repository and give local-dir:PATH") from None


def source_config(model: str) -> dict[str, Any]:
    """`{"model_cfg", "preprocess_cfg"}` of an open_clip model name, `local-dir:PATH` or `hf-hub:ID`."""
    if model.startswith(LOCAL_DIR):
        return read_config_file(local_dir_path(model) / CONFIG_FILE)
    if model.startswith(HF_HUB):
        return hub_config(model[len(HF_HUB):])
    import open_clip

    found = open_clip.get_model_config(model)
    if found is None:
        raise ValueError(f"unknown open_clip model {model!r}; see open_clip.list_models(), or give local-dir:PATH")
    return {"model_cfg": found, "preprocess_cfg": {}}


def check_supported(model_cfg: dict[str, Any]) -> None:
    """ValueError naming what this project cannot train: the tokenizer and text towers it does not produce tokens
    for, and CoCa's class token."""
    from open_clip.model import CLIPTextCfg

    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa models (multimodal_cfg) are not supported as the student; use a CLIP architecture")
    try:
        text = CLIPTextCfg(**model_cfg.get("text_cfg", {}))
    except TypeError as err:
        raise ValueError(f"text_cfg is not open_clip's ({err})") from None
    if text.hf_tokenizer_name or text.hf_model_name:
        raise ValueError(f"its text tower uses Hugging Face's {text.hf_tokenizer_name or text.hf_model_name!r}; only "
                         f"text towers over the CLIP BPE tokenizer are supported")
    if text.vocab_size != CLIP_BPE_VOCAB:
        raise ValueError(f"its text vocabulary has {text.vocab_size} tokens; the CLIP BPE tokenizer has "
                         f"{CLIP_BPE_VOCAB}")
    if text.embed_cls:
        raise ValueError("its text tower appends a class token (embed_cls); not supported")
    if text.pool_type not in POOLING:
        raise ValueError(f"its text pooling {text.pool_type!r} is not one of {', '.join(POOLING)}")


def square_size(size: Any) -> int:
    """open_clip's image size (an int, or a [h, w] pair) as one side; a non-square size is a ValueError."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square image size {list(size)} is not supported")
        size = size[0]
    return int(size)


def preprocess(model: str, pretrained: str | None, source: dict[str, Any], image_size: int) -> dict[str, Any]:
    """open_clip's preprocessing for the model: its defaults, the config's `preprocess_cfg`, the pretrained tag's."""
    from open_clip.factory import PreprocessCfg, get_pretrained_cfg, merge_preprocess_dict

    found = merge_preprocess_dict(asdict(PreprocessCfg()), source.get("preprocess_cfg") or {})
    if pretrained and not model.startswith((LOCAL_DIR, HF_HUB)):
        found = merge_preprocess_dict(found, get_pretrained_cfg(model, pretrained) or {})
    return {"size": image_size, "mean": [float(v) for v in found["mean"]], "std": [float(v) for v in found["std"]],
            "interpolation": found["interpolation"]}


def section_values(model_cfg: dict[str, Any], pp: dict[str, Any]) -> dict[str, Any]:
    """The `model` section's values an open_clip architecture stands for (nested like params.yaml)."""
    from open_clip.model import CLIPTextCfg

    text = CLIPTextCfg(**model_cfg.get("text_cfg", {}))
    return {
        "embed_dim": int(model_cfg["embed_dim"]),
        "image": {"tower": TOWER, "size": pp["size"], "output_stride": None, "mean": pp["mean"], "std": pp["std"],
                  "interpolation": pp["interpolation"]},
        "text": {"kind": "transformer", "context_length": int(text.context_length), "width": int(text.width),
                 "heads": int(text.heads), "layers": int(text.layers), "mlp_ratio": float(text.mlp_ratio),
                 "causal": not text.no_causal_mask},
    }


def lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(values, dict) or key not in values:
            return None
        values = values[key]
    return values


def conflicts(explicit: dict[str, Any], derived: dict[str, Any]) -> str | None:
    """The first architecture field params.yaml sets to another value than the open_clip model's, as a message."""
    for path in ARCHITECTURE_FIELDS:
        given, own = lookup(explicit, path), lookup(derived, path)
        if given is not None and given != own and not (isinstance(own, float) and given == own):
            return (f"model.{'.'.join(path)}={given!r}: the open_clip student's is {own!r}; leave it null (the "
                    f"open_clip model decides it)")
    return None


def fill_section(explicit: dict[str, Any]) -> dict[str, Any]:
    """The `model` section (nulls dropped) with `open_clip` resolved: its `model_cfg` recorded and the fields it decides
    filled in. A section that already records `model_cfg` (a checkpoint's or an export's) is taken as it is."""
    spec = dict(explicit["open_clip"]) if isinstance(explicit.get("open_clip"), dict) else None
    if spec is None or spec.get("model_cfg") is not None:
        return explicit
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        return explicit  # the schema names the missing or malformed field
    try:
        source = source_config(model)
        model_cfg = {**copy.deepcopy(source["model_cfg"]), "custom_text": True}
        check_supported(model_cfg)
        pp = preprocess(model, spec.get("pretrained"), source,
                        square_size(model_cfg["vision_cfg"].get("image_size", 224)))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"model.open_clip.model={model!r}: {err}") from None
    derived = section_values(model_cfg, pp)
    clash = conflicts(explicit, derived)
    if clash:
        raise ValueError(clash)
    return merge(derived, {**explicit, "open_clip": {**spec, "model_cfg": model_cfg}})


def has_own_weights(model: str) -> bool:
    """Whether the model names its weights itself: an `hf-hub:` repository, or a local-dir holding a weights file."""
    return model.startswith(HF_HUB) or local_dir_weights(model) is not None


def register_towers(model_cfg: dict[str, Any]) -> None:
    """Register the config's timm tower first when it is one of this project's dilated variants (`<tower>_os16`)."""
    from lightclip_core.models.timm_variants import ensure_registered

    tower = model_cfg.get("vision_cfg", {}).get("timm_model_name")
    if tower:
        ensure_registered(tower)


def local_dir_weights(model: str) -> Path | None:
    """The weights file of a `local-dir:` model (open_clip's preferred names), None when it holds a config only."""
    if not model.startswith(LOCAL_DIR):
        return None
    directory = local_dir_path(model)
    return next((directory / name for name in WEIGHTS_FILES if (directory / name).is_file()), None)
