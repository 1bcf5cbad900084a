"""The interface every model family implements (no Django imports).

A family builds an unfitted scikit-learn compatible pipeline (features + classifier) from a feature spec,
calibrates the fitted classifier on held-out rows (isotonic or Platt for scikit-learn, temperature scaling for
networks), and explains predictions. Conformal sets, risk control and evaluation are applied by the training
core on top of any family, so they behave the same for all.

Families whose weights are not scikit-learn objects (the torch families) also set ``stores_weights = True`` and
implement ``weights_bytes(model)`` / ``network_info(model)`` / ``restore(info, weights)``: their weights are a
separate artifact (a torch state_dict) stored by hash beside the skops bundle.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd


class Family(Protocol):
    name: str
    title: str

    def params(self, *, seed: int) -> dict[str, Any]:
        """Hyper-parameters as recorded in the model registry."""
        ...

    def build(self, spec: dict[str, Any], *, seed: int) -> Any:
        """An unfitted estimator with fit / predict_proba / classes_ over a frame from ``frame_from_payloads``."""
        ...

    def calibrate(self, fitted: Any, X_cal: Any, y_cal: np.ndarray) -> tuple[Any, dict[str, Any]]:
        """A calibrated wrapper (``predict_proba``, ``classes_``) over the fitted classifier step, and what was
        done (``{"method": ...}``), from held-out rows the classifier was not fitted on."""
        ...

    def explain(
        self,
        model: Any,
        frame: pd.DataFrame,
        X: Any,
        target: np.ndarray,
        *,
        top_k: int = 6,
        top_tokens: int = 5,
    ) -> list[dict[str, Any]]:
        """Per row, the contributions of payload fields (and text tokens) towards class index ``target[i]`` of
        ``model.classes``. ``model`` is a TrainedModel (``pipeline``, ``calibrated``, ``spec``, ``classes``,
        ``predict_proba(frame)``); ``X`` is ``frame`` already through the pipeline's features."""
        ...
