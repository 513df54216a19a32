"""The teacher ensemble: open_clip models, loaded through open_clip's own factory, that embed images and texts.

A teacher is a :class:`TeacherSpec`: an open_clip model name with a pretrained tag or checkpoint (a path or an
`s3://` URI), or `local-dir:PATH` (open_clip_config.json + weights; PATH may be an `s3://` prefix). Remote inputs are
fetched into a cache directory first. Every load failure is a :class:`TeacherLoadError` with a one-line message
naming the spec. The ensemble's embedding of a batch is the concatenation of each teacher's L2-normalised
embedding, in ensemble order (the layout a reinforced dataset stores).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from lightclip_core.config import TeacherSpec
from lightclip_core.data.transforms import image_transform, to_rgb
from lightclip_core.infra.storage import fetch_to_local, is_s3
from lightclip_core.models.open_clip_arch import CONFIG_FILE, LOCAL_DIR, register_towers, square_size

log = logging.getLogger(__name__)

# teachers' image towers run channels-last: 1.5x for a CNN on a CPU (benchmarks/stage_speed.py), harmless for a ViT
IMAGE_LAYOUT = torch.channels_last



class TeacherLoadError(ValueError):
    """A teacher cannot be loaded. The message is one line: the spec (model, pretrained) and the cause."""


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with frozen parameters, and how to feed it."""

    model: nn.Module
    name: str  # the resolved open_clip model name (local paths instead of s3:// URIs)
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def describe_spec(spec: TeacherSpec) -> str:
    return f"teacher (model={spec.model!r}, pretrained={spec.pretrained!r})"


def _one_line(err: BaseException) -> str:
    """The cause on one line: its first sentence (open_clip appends model lists, torch advice), at most 300 chars."""
    text = " ".join(str(err).split()) or "no message"
    first = text.split(". ", 1)[0]
    return f"{type(err).__name__}: {first[:300]}"


def resolve_spec(spec: TeacherSpec, cache_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(model_name, pretrained) for open_clip, with `s3://` checkpoints and `local-dir:s3://` prefixes fetched."""
    model, pretrained = spec.model, spec.pretrained
    if model.startswith(LOCAL_DIR):
        location = model[len(LOCAL_DIR):]
        if is_s3(location):
            location = str(fetch_to_local(location.rstrip("/") + "/", cache_dir))
        model = LOCAL_DIR + location
    if pretrained is not None and is_s3(pretrained):
        pretrained = str(fetch_to_local(pretrained, cache_dir))
    return model, pretrained


def _register_tower(name: str) -> None:
    """A local-dir whose timm tower is one of this project's dilated variants (`<tower>_os16`): register it first."""
    config = Path(name[len(LOCAL_DIR):]) / CONFIG_FILE if name.startswith(LOCAL_DIR) else None
    if config is not None and config.is_file():
        register_towers(json.loads(config.read_text()).get("model_cfg", {}))


def _create(name: str, pretrained: str | None, device: torch.device) -> nn.Module:
    _register_tower(name)
    if name.startswith(LOCAL_DIR) and pretrained is not None:
        # open_clip ignores `pretrained` for a schema name: take the architecture from the directory, the weights
        # from the given checkpoint
        model = open_clip.create_model(name, load_weights=False, device=device)
        open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
        return model.to(device)
    return open_clip.create_model(name, pretrained, device=device, require_pretrained=True, weights_only=True)


def load_model(spec: TeacherSpec, cache_dir: str | os.PathLike, device: str | torch.device) -> LoadedModel:
    """Load `spec` through open_clip (eval mode, no gradients) with its preprocessing parameters."""
    try:
        name, pretrained = resolve_spec(spec, cache_dir)
        model = _create(name, pretrained, torch.device(device))
        pp = model.visual.preprocess_cfg
        loaded = LoadedModel(model, name, square_size(pp["size"]), tuple(float(v) for v in pp["mean"]),
                             tuple(float(v) for v in pp["std"]), str(pp.get("interpolation", "bicubic")))
    except Exception as err:
        raise TeacherLoadError(f"cannot load {describe_spec(spec)}: {_one_line(err)}") from err
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s: image size %d", describe_spec(spec), loaded.image_size)
    return loaded


def load_open_clip(spec: TeacherSpec, cache_dir: str | os.PathLike,
                   device: str | torch.device) -> tuple[nn.Module, int, tuple[float, ...], tuple[float, ...]]:
    """(model, image_size, mean, std) of `spec`; see :func:`load_model`."""
    m = load_model(spec, cache_dir, device)
    return m.model, m.image_size, m.mean, m.std


def load_tokenizer(spec: TeacherSpec, name: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the model (for a local-dir: the BPE tokenizer at its text context length)."""
    try:
        return open_clip.get_tokenizer(name)
    except Exception as err:
        raise TeacherLoadError(f"cannot load the tokenizer of {describe_spec(spec)}: {_one_line(err)}") from err


def eval_transform(loaded: LoadedModel) -> T.Compose:
    """PIL image -> normalised tensor at the model's size: resize the short side, centre-crop."""
    interpolation = loaded.interpolation if loaded.interpolation in ("bilinear", "bicubic") else "bicubic"
    return image_transform(loaded.image_size, loaded.mean, loaded.std, interpolation)


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """`model.encode_text(tokens)`, computed over only the columns up to the batch's last end-of-text token when
    that is exact: an open_clip `CLIP` whose text transformer is causal and pooled at the end-of-text token (the
    argmax id), so no padding column after it can reach it. Captions of ~10 tokens padded to 32 or 77 then cost a
    third or less. Any other model (CoCa, SigLIP's text towers, HF towers) goes through its own encode_text."""
    if not (isinstance(model, open_clip.CLIP) and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None):
        return model.encode_text(tokens, normalize=normalize)
    used = int(tokens.argmax(dim=1).max()) + 1
    text = tokens[:, :used]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:used].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:used, :used]))
    x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


class Teacher:
    """One ensemble member: the model, its tokenizer, embedding width, distillation scale and preprocessing."""

    def __init__(self, spec: TeacherSpec, cache_dir: str | os.PathLike, device: torch.device):
        self.spec = spec
        self.loaded = load_model(spec, cache_dir, device)
        self.model = self.loaded.model.to(memory_format=IMAGE_LAYOUT)
        self.tokenizer = load_tokenizer(spec, self.loaded.name)
        self.device = device
        self.transform = eval_transform(self.loaded)
        self.normalize = T.Compose([T.Lambda(to_rgb), T.ToTensor(), T.Normalize(self.loaded.mean, self.loaded.std)])
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])
        own_scale = float(self.model.logit_scale.exp().reshape(-1)[0]) if hasattr(self.model, "logit_scale") else None
        self.logit_scale = spec.logit_scale if spec.logit_scale is not None else own_scale
        if self.logit_scale is None:
            raise TeacherLoadError(f"{describe_spec(spec)} has no logit_scale; set logit_scale in the spec")

    def describe(self) -> dict[str, Any]:
        """What identifies this teacher in a reinforcement's fingerprint: the spec, and the weights themselves (a
        retrained teacher at the same path, or a same-named checkpoint that changed, must not reuse shards)."""
        return {"model": self.spec.model, "pretrained": self.spec.pretrained, "dim": self.dim,
                "logit_scale": self.logit_scale, "image_size": self.loaded.image_size,
                "mean": list(self.loaded.mean), "std": list(self.loaded.std),
                "weights_sha256": weights_digest(self.model)}


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TeacherEnsemble:
    """Teachers whose L2-normalised embeddings are concatenated, in order, into one `[B, sum(dims)]` tensor."""

    def __init__(self, specs: Sequence[TeacherSpec], cache_dir: str | os.PathLike,
                 device: str | torch.device = "cpu"):
        if not specs:
            raise ValueError("a teacher ensemble needs at least one teacher")
        self.device = torch.device(device)
        self.teachers = [Teacher(spec, cache_dir, self.device) for spec in specs]

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def dims(self) -> list[int]:
        return [t.dim for t in self.teachers]

    @property
    def scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    @property
    def image_sizes(self) -> list[int]:
        return [t.loaded.image_size for t in self.teachers]

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.teachers]

    def preprocess(self, image, teacher_index: int) -> torch.Tensor:
        """A PIL image as teacher `teacher_index` reads it: short side resized, centre-cropped, normalised."""
        return self.teachers[teacher_index].transform(image)

    def to_tensor(self, image, teacher_index: int) -> torch.Tensor:
        """A PIL image already at the teacher's size, normalised (any other size goes through :meth:`preprocess`)."""
        teacher = self.teachers[teacher_index]
        if image.size != (teacher.loaded.image_size,) * 2:
            return teacher.transform(image)
        return teacher.normalize(image)

    @torch.inference_mode()
    def encode_images(self, images_per_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """`[B, sum(dims)]` from one preprocessed batch per teacher (the same images, each at its teacher's size)."""
        if len(images_per_teacher) != len(self.teachers):
            raise ValueError(f"{len(images_per_teacher)} image batches for {len(self.teachers)} teachers")
        parts = [F.normalize(t.model.encode_image(x.to(self.device, memory_format=IMAGE_LAYOUT)).float(),
                             dim=-1)
                 for t, x in zip(self.teachers, images_per_teacher)]
        return torch.cat(parts, dim=1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """`[B, sum(dims)]`: every teacher's embedding of `texts` through its own tokenizer."""
        texts = list(texts)
        parts = [F.normalize(encode_text(t.model, t.tokenizer(texts).to(self.device)).float(), dim=-1)
                 for t in self.teachers]
        return torch.cat(parts, dim=1)
