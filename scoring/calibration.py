"""Calibration and split-conformal prediction sets: pure functions (no Django imports).

- ``calibrate`` wraps an already fitted classifier in CalibratedClassifierCV(FrozenEstimator(...)), the
  scikit-learn >= 1.6 replacement for ``cv="prefit"``: isotonic with enough held-out labels, Platt (sigmoid)
  otherwise, since isotonic overfits small calibration sets.
- ``expected_calibration_error`` / ``reliability_bins``: top-label confidence against accuracy, equal-width bins.
- ``temperature_fit``: temperature scaling for networks (one parameter T, logits / T, fitted by log loss on
  held-out rows); it keeps the ranking and argmax of the network, and fixes its over- or under-confidence.
- Split-conformal sets, LAC (score = 1 - p(true label); the set keeps every label with p >= 1 - qhat) or APS
  (score = probability mass of the labels ranked at or above the true one; the set is the shortest top-ranked
  prefix reaching qhat, non-randomised, so slightly conservative). Either bounds coverage (the true label is in
  the set with probability >= 1 - alpha), not the error among items whose set is a singleton.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator

CONFORMAL_METHODS = ("lac", "aps")

# Below these, isotonic regression overfits; Platt scaling has two parameters and copes.
ISOTONIC_MIN_SAMPLES = 1000
ISOTONIC_MIN_PER_CLASS = 50


def choose_method(y_cal: np.ndarray) -> str:
    _, counts = np.unique(y_cal, return_counts=True)
    if len(y_cal) >= ISOTONIC_MIN_SAMPLES and counts.min() >= ISOTONIC_MIN_PER_CLASS:
        return "isotonic"
    return "sigmoid"


def calibrate(fitted: Any, X_cal: Any, y_cal: np.ndarray, *, method: str | None = None) -> CalibratedClassifierCV:
    """Calibrate ``fitted`` (never refitted) on held-out rows."""
    method = method or choose_method(np.asarray(y_cal))
    calibrated = CalibratedClassifierCV(FrozenEstimator(fitted), method=method)
    calibrated.fit(X_cal, y_cal)
    return calibrated


def temperature_fit(logits: np.ndarray, y_index: np.ndarray) -> float:
    """The temperature T > 0 minimising the log loss of softmax(logits / T) on held-out rows (bounded search
    over log T, so it is deterministic and needs no torch)."""
    logits = np.asarray(logits, dtype=np.float64)
    y_index = np.asarray(y_index, dtype=int)
    if len(y_index) == 0:
        return 1.0
    rows = np.arange(len(y_index))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, y_index].mean())

    best = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


def temperature_proba(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)


def _top(proba: np.ndarray, y_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_index).astype(float)
    return confidence, correct


def reliability_bins(proba: np.ndarray, y_index: np.ndarray, *, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins of top-label confidence: count, mean confidence, accuracy (empty bins kept, count 0)."""
    confidence, correct = _top(proba, y_index)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 falls into the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    out = []
    for i in range(n_bins):
        mask = which == i
        n = int(mask.sum())
        out.append({
            "lo": round(float(edges[i]), 4),
            "hi": round(float(edges[i + 1]), 4),
            "count": n,
            "confidence": float(confidence[mask].mean()) if n else None,
            "accuracy": float(correct[mask].mean()) if n else None,
        })
    return out


def expected_calibration_error(proba: np.ndarray, y_index: np.ndarray, *, n_bins: int = 10) -> float:
    """Weighted mean |accuracy - confidence| over equal-width top-label confidence bins."""
    total = len(y_index)
    if total == 0:
        return float("nan")
    ece = 0.0
    for b in reliability_bins(proba, y_index, n_bins=n_bins):
        if b["count"]:
            ece += b["count"] / total * abs(b["accuracy"] - b["confidence"])
    return float(ece)


def conformal_scores(proba: np.ndarray, y_index: np.ndarray, *, method: str = "lac") -> np.ndarray:
    """Non-conformity of the true label: LAC 1 - p(y); APS the mass of labels ranked at or above y."""
    n = len(y_index)
    p_true = proba[np.arange(n), y_index]
    if method == "lac":
        return 1.0 - p_true
    if method == "aps":
        # Labels with a strictly higher probability, plus y itself (ties count the true label last-in-rank
        # order only through itself, which keeps the score deterministic).
        return (proba * (proba > p_true[:, None])).sum(axis=1) + p_true
    raise ValueError(f"unknown conformal method {method!r}; choose one of {', '.join(CONFORMAL_METHODS)}")


def conformal_qhat(proba: np.ndarray, y_index: np.ndarray, *, alpha: float, method: str = "lac") -> float:
    """The threshold from held-out rows: the ceil((n+1)(1-alpha))/n empirical quantile of the scores.
    With too few rows for the level, returns the score's maximum (every label in every set: an honest
    "don't know")."""
    n = len(y_index)
    top = 1.0 if method == "lac" else 1.0 + 1e-9
    if n == 0:
        return top
    scores = conformal_scores(proba, y_index, method=method)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return top
    return float(np.sort(scores)[rank - 1])


def conformal_sets(proba: np.ndarray, qhat: float, *, method: str = "lac") -> np.ndarray:
    """Boolean membership matrix (rows x labels)."""
    # A tiny tolerance so a probability equal to the threshold up to float rounding stays in.
    if method == "lac":
        return proba >= (1.0 - qhat) - 1e-12
    if method == "aps":
        # Label j is in when the mass ranked strictly above it has not yet reached qhat: the shortest prefix
        # of the ranking whose mass reaches qhat (the label crossing it included).
        above = (proba[:, None, :] * (proba[:, None, :] > proba[:, :, None])).sum(axis=2)
        return above < qhat - 1e-12
    raise ValueError(f"unknown conformal method {method!r}; choose one of {', '.join(CONFORMAL_METHODS)}")


def conformal_evaluate(proba: np.ndarray, y_index: np.ndarray, *, alpha: float, method: str = "lac") -> dict[str, Any]:
    """qhat from all rows, with coverage estimated honestly by two-fold cross-fitting (the quantile of one half
    applied to the other), since coverage measured on the rows that set the quantile would be optimistic."""
    n = len(y_index)
    qhat = conformal_qhat(proba, y_index, alpha=alpha, method=method)
    halves = [np.arange(n) % 2 == 0, np.arange(n) % 2 == 1]
    covered = 0
    sizes = 0.0
    singletons = 0
    singleton_errors = 0
    for fit_mask, eval_mask in (halves, halves[::-1]):
        q = conformal_qhat(proba[fit_mask], y_index[fit_mask], alpha=alpha, method=method)
        sets = conformal_sets(proba[eval_mask], q, method=method)
        y_eval = y_index[eval_mask]
        covered += int(sets[np.arange(len(y_eval)), y_eval].sum())
        size = sets.sum(axis=1)
        sizes += float(size.sum())
        single = size == 1
        singletons += int(single.sum())
        singleton_errors += int((single & ~sets[np.arange(len(y_eval)), y_eval]).sum())
    return {
        "method": method,
        "alpha": alpha,
        "target_coverage": 1 - alpha,
        "qhat": qhat,
        "n": n,
        "coverage": covered / n if n else None,
        "mean_set_size": sizes / n if n else None,
        "singleton_rate": singletons / n if n else None,
        # Shown beside coverage because people read singletons as "certain"; they are not.
        "singleton_error": singleton_errors / singletons if singletons else None,
    }
