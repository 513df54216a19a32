"""The registered LightCLIP model, logged as MLflow "models from code": MLflow stores this file, not a pickle.

`load_context` builds an :class:`~lightclip_core.export.inference.Embedder` from the `export` artifact (the
export directory: ONNX encoders, config.json, weights); `predict` takes a DataFrame with `image` and/or `text`
columns and returns embeddings, or zero-shot labels when `params={"classnames": [...]}` is given. The model
configuration (`model_config`) carries the default prompt templates and the batch size.
"""
from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from lightclip_core.export.format import EXPORT_ARTIFACT


class LightCLIPModel(PythonModel):
    """pyfunc wrapper of an exported LightCLIP model (see lightclip_core.export.inference)."""

    def load_context(self, context: Any) -> None:
        from lightclip_core.export.inference import Embedder

        config = context.model_config or {}
        self.templates = list(config.get("templates") or [])
        self.embedder = Embedder(context.artifacts[EXPORT_ARTIFACT], batch_size=int(config.get("batch_size", 64)))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from lightclip_core.export.inference import predict_frame

        params = dict(params or {})
        if not params.get("templates") and self.templates:
            params["templates"] = self.templates
        return predict_frame(self.embedder, pd.DataFrame(model_input), params)


mlflow.models.set_model(LightCLIPModel())
