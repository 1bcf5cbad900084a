"""Scoring with a trained model: vectorised over a batch (no Django imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

from scoring.calibration import conformal_sets
from scoring.estimators import TORCH_FAMILIES, get_family
from scoring.features import transform as fast_transform

BUNDLE_FORMAT = 1
_controller: ThreadpoolController | None = None


def limit_threads(threads: int) -> Any:
    """A context bounding OpenMP/BLAS threads. The controller (a scan of loaded libraries, ~5 ms) is made once
    per process, after scikit-learn has loaded its native libraries, so single-item scoring stays cheap."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=threads)


@dataclass
class TrainedModel:
    """A fitted family pipeline plus a calibrator over its classifier, with everything needed to score raw
    payloads again. Features are computed once per batch and shared by probabilities and explanations."""

    algorithm: str
    params: dict[str, Any]
    spec: dict[str, Any]
    label_set: list[str]
    pipeline: Any  # the family's fitted Pipeline: "features" (ColumnTransformer) then "model"
    calibrated: Any  # CalibratedClassifierCV over a FrozenEstimator of pipeline["model"], fed features
    calibration: dict[str, Any] = field(default_factory=dict)
    conformal: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Positions (in the training input) of the final held-out part and the model's probabilities there (columns
    # in label-set order); in memory only, for champion comparisons and risk control.
    test_index: list[int] = field(default_factory=list)
    test_proba: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.calibrated.classes_]

    def transform(self, frame: pd.DataFrame) -> Any:
        return fast_transform(self.pipeline.named_steps["features"], frame)

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated probabilities in ``classes`` order (a scikit-learn style hook for explainers)."""
        return np.asarray(self.calibrated.predict_proba(self.transform(frame)), dtype=float)

    @property
    def stores_weights(self) -> bool:
        """Whether the weights live outside the skops bundle (torch families), without importing the family."""
        return self.algorithm in TORCH_FAMILIES

    def to_bundle(self, *, weights_sha256: str | None = None) -> dict[str, Any]:
        """What the skops artifact stores: plain containers and scikit-learn objects only. A torch family's
        network is described by plain numbers plus the hash of its separately stored state_dict."""
        bundle: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "algorithm": self.algorithm,
            "params": self.params,
            "spec": self.spec,
            "label_set": list(self.label_set),
            "calibration": self.calibration,
            "conformal": self.conformal,
        }
        if self.stores_weights:
            if not weights_sha256:
                raise ValueError("a network's bundle needs the hash of its stored weights")
            bundle["features"] = self.pipeline.named_steps["features"]
            bundle["network"] = {**get_family(self.algorithm).network_info(self), "weights_sha256": weights_sha256}
        else:
            bundle["pipeline"] = self.pipeline
            bundle["calibrated"] = self.calibrated
        return bundle

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], *, weights: bytes | None = None) -> TrainedModel:
        if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
            raise ValueError("not a model bundle this version can read")
        if "network" in bundle:
            if weights is None:
                raise ValueError("a network's bundle needs its weights")
            pipeline, calibrated = get_family(bundle["algorithm"]).restore(bundle["network"], bundle["features"],
                                                                            weights)
        else:
            pipeline, calibrated = bundle["pipeline"], bundle["calibrated"]
        return cls(
            algorithm=bundle["algorithm"],
            params=bundle["params"],
            spec=bundle["spec"],
            label_set=list(bundle["label_set"]),
            pipeline=pipeline,
            calibrated=calibrated,
            calibration=bundle.get("calibration") or {},
            conformal=bundle.get("conformal") or {},
        )


@dataclass(frozen=True)
class PredictionRow:
    probabilities: dict[str, float]  # label -> p, in label_set order
    top_label: str
    confidence: float
    alternatives: list[list[Any]]  # [[label, p], ...] after the top label, highest first
    prediction_set: list[str]
    explanation: dict[str, Any] | None = None


def _to_label_set(model: TrainedModel, raw: np.ndarray, label_set: list[str]) -> np.ndarray:
    """Columns in ``label_set`` order. A label the model never saw gets 0; a label the model knows but the set
    no longer has is dropped and the rest renormalised."""
    position = {label: j for j, label in enumerate(model.classes)}
    out = np.zeros((raw.shape[0], len(label_set)))
    for k, label in enumerate(label_set):
        if label in position:
            out[:, k] = raw[:, position[label]]
    out = np.clip(out, 0.0, 1.0)
    totals = out.sum(axis=1, keepdims=True)
    # Rows whose every known label vanished: no information, so uniform.
    safe = np.where(totals > 0, totals, 1.0)
    return np.where(totals > 0, out / safe, 1.0 / max(len(label_set), 1))


def predict_proba_labels(model: TrainedModel, frame: pd.DataFrame, label_set: list[str]) -> np.ndarray:
    """Calibrated probabilities with columns in ``label_set`` order."""
    return _to_label_set(model, model.predict_proba(frame), label_set)


def predict(
    model: TrainedModel, frame: pd.DataFrame, label_set: list[str], *, explain: bool = False,
    threads: int | None = 1,
) -> list[PredictionRow]:
    """One PredictionRow per frame row, in order. ``threads`` bounds OpenMP/BLAS threads (see ``train``)."""
    if len(frame) == 0:
        return []
    if threads is None:
        return _predict(model, frame, label_set, explain=explain)
    with limit_threads(threads):
        return _predict(model, frame, label_set, explain=explain)


def _predict(model: TrainedModel, frame: pd.DataFrame, label_set: list[str], *, explain: bool) -> list[PredictionRow]:
    X = model.transform(frame)
    proba = _to_label_set(model, np.asarray(model.calibrated.predict_proba(X), dtype=float), label_set)
    order = np.argsort(-proba, axis=1, kind="stable")
    qhat = model.conformal.get("qhat")
    members = (conformal_sets(proba, float(qhat), method=model.conformal.get("method", "lac"))
               if qhat is not None else None)
    explanations: list[dict[str, Any]] | None = None
    if explain:
        explanations = explain_rows(model, frame, [label_set[int(j)] for j in order[:, 0]], X=X)
    # Not rounded: a policy threshold is compared with exactly what the model said. Columns are built over whole
    # arrays and turned into Python objects with one tolist() each: per-element numpy scalar access was ~15% of a
    # worker's time at 2,000 rows per chunk.
    ranked_labels = np.asarray(list(label_set), dtype=object)[order].tolist()
    ranked_proba = np.take_along_axis(proba, order, axis=1).tolist()
    # Without a conformal quantile every set is empty: no member in any row.
    ranked_members = (np.take_along_axis(members, order, axis=1) if members is not None
                      else np.zeros(order.shape, dtype=bool)).tolist()
    labels = list(label_set)
    rows = []
    for i, (row_proba, names, values, inside) in enumerate(
            zip(proba.tolist(), ranked_labels, ranked_proba, ranked_members, strict=True)):
        rows.append(PredictionRow(
            probabilities=dict(zip(labels, row_proba, strict=True)),
            top_label=names[0],
            confidence=values[0],
            alternatives=[[name, value] for name, value in zip(names[1:], values[1:], strict=True)],
            prediction_set=[name for name, member in zip(names, inside, strict=True) if member],
            explanation=explanations[i] if explanations else None,
        ))
    return rows


def explain_rows(
    model: TrainedModel, frame: pd.DataFrame, targets: list[str], *, X: Any = None
) -> list[dict[str, Any]] | None:
    """Per-row explanations towards each row's target label, or None where the family cannot explain it."""
    family = get_family(model.algorithm)
    index = {c: j for j, c in enumerate(model.classes)}
    if any(t not in index for t in targets):
        return None
    target = np.array([index[t] for t in targets], dtype=int)
    return family.explain(model, frame, model.transform(frame) if X is None else X, target)
