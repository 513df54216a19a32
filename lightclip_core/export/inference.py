"""Inference behind the registered pyfunc model: embed images and texts with an export directory, and zero-shot
classify images against class names.

The encoders are the exported ONNX graphs (onnxruntime) when the export has them, which is the inference model
whose parity with PyTorch the export stage checked; otherwise the PyTorch model rebuilt by `load_exported`.
Preprocessing and tokenisation are the export's own (`load_exported`), exactly those of the evaluation.

Input frame: optional columns `image` (encoded image bytes such as PNG/JPEG, or an HxWx3 / HxW uint8 array) and
`text` (string); a row may hold either or both. Output frame, one row per input row: `image_embedding` and
`text_embedding` (lists of floats, L2-normalised; None where the row had no such input), and `label` / `score`
(with `classnames`: the best class for the row's image and its cosine similarity; None otherwise).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lightclip_core.config import DEFAULT_TEMPLATES

OUTPUT_COLUMNS = ["image_embedding", "text_embedding", "label", "score"]


def to_pil(value: Any):
    """An RGB PIL image from encoded bytes (or a base64 string of them) or a uint8 array."""
    from PIL import Image

    if isinstance(value, str):
        import base64

        value = base64.b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as image:
            return image.convert("RGB")
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"an image array must be HxW or HxWxC uint8, got {array.dtype} with shape {array.shape}")
    return Image.fromarray(array).convert("RGB")


class Embedder:
    """The encoders and input pipeline of one export directory.

    `load_exported` gives the preprocessing, the tokenizer and the PyTorch model; the ONNX encoders, when the
    export has them, do the encoding."""

    def __init__(self, export_dir: str | os.PathLike, batch_size: int = 64):
        from lightclip_core.export.load import load_exported

        self.export_dir = Path(export_dir)
        self.exported = load_exported(export_dir)
        self.config = self.exported.config
        self.batch_size = batch_size
        files = self.config.get("files", {})
        onnx_files = {name: self.export_dir / files[name] for name in ("image_encoder", "text_encoder")
                      if name in files}
        self._sessions: dict[str, Any] = {}
        if "onnx" in self.config and len(onnx_files) == 2 and all(p.is_file() for p in onnx_files.values()):
            import onnxruntime as ort

            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
            self._sessions = {name: ort.InferenceSession(str(path), providers=providers)
                              for name, path in onnx_files.items()}

    @property
    def backend(self) -> str:
        return "onnxruntime" if self._sessions else "torch"

    def _run(self, encoder: str, batch: np.ndarray) -> np.ndarray:
        if self._sessions:
            meta = self.config["onnx"]
            return self._sessions[encoder].run([meta["output"]], {meta["inputs"][encoder]: batch})[0]
        import torch

        model = self.exported.model
        with torch.inference_mode():
            fn = model.encode_image if encoder == "image_encoder" else model.encode_text
            return fn(torch.from_numpy(batch)).numpy()

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """[N, D] float32 embeddings of images given as bytes, arrays or PIL images."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [self.exported.preprocess(im if hasattr(im, "convert") else to_pil(im))
                     for im in images[start:start + self.batch_size]]
            out.append(self._run("image_encoder", np.stack([t.numpy() for t in chunk]).astype(np.float32)))
        return np.concatenate(out) if out else np.zeros((0, int(self.config["embed_dim"])), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = [self._run("text_encoder",
                         self.exported.tokenize(list(texts[start:start + self.batch_size])).numpy().astype(np.int64))
               for start in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, int(self.config["embed_dim"])), np.float32)

    def class_weights(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[C, D]: per class, the normalised mean of its normalised prompt embeddings (as in evaluation)."""
        prompts = [t.format(c) for c in classnames for t in templates]
        emb = self.encode_texts(prompts).reshape(len(classnames), len(templates), -1)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        mean = emb.mean(axis=1)
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


def predict_frame(embedder: Embedder, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Embeddings for every row, plus zero-shot labels when `params["classnames"]` is given (module docstring)."""
    params = params or {}
    classnames = [str(c) for c in (params.get("classnames") or [])]
    templates = [str(t) for t in (params.get("templates") or DEFAULT_TEMPLATES)]
    if any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' slot for the class name, got {templates}")
    n = len(frame)
    images = frame["image"].tolist() if "image" in frame else [None] * n
    texts = frame["text"].tolist() if "text" in frame else [None] * n
    if not any(_present(v) for v in images + texts):
        raise ValueError("the input needs an `image` or a `text` column with at least one value")
    out = pd.DataFrame({col: pd.Series([None] * n, dtype=object) for col in OUTPUT_COLUMNS})
    image_rows = [i for i, v in enumerate(images) if _present(v)]
    text_rows = [i for i, v in enumerate(texts) if _present(v)]
    image_emb = embedder.encode_images([images[i] for i in image_rows])
    text_emb = embedder.encode_texts([str(texts[i]) for i in text_rows])
    for row, emb in zip(image_rows, image_emb):
        out.at[row, "image_embedding"] = emb.astype(float).tolist()
    for row, emb in zip(text_rows, text_emb):
        out.at[row, "text_embedding"] = emb.astype(float).tolist()
    if classnames and image_rows:
        scores = image_emb @ embedder.class_weights(classnames, templates).T
        for row, best, score in zip(image_rows, scores.argmax(axis=1), scores.max(axis=1)):
            out.at[row, "label"] = classnames[int(best)]
            out.at[row, "score"] = float(score)
    return out
