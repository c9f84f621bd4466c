"""The registered model as an MLflow pyfunc, so that any MLflow client can load it.

``predict`` takes a frame with a ``user_id`` column and returns the EMA
teacher's embedding of each known user (NaN rows for unknown users).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd


class EmarecPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from models.bundle import load_bundle

        self.bundle = load_bundle(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        ids = [int(u) for u in model_input["user_id"]]
        out = np.full((len(ids), self.bundle.embedding_dim), np.nan, np.float32)
        known = [i for i, u in enumerate(ids) if self.bundle.has_user(u)]
        if known:
            out[known] = self.bundle.user_embeddings([ids[i] for i in known])
        return pd.DataFrame(out, index=model_input.index)
