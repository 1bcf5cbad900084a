"""Training on labeled rows with a time-ordered split: fit, calibrate, evaluate (no Django imports).

The input order is time order. The oldest part fits the model, the next part calibrates it, and the newest
part (never seen by either) measures it, sets the conformal threshold and is the common ground on which a
candidate is compared with the champion. The model evaluated is the model shipped: nothing is refitted
after evaluation, so the metrics describe the artifact.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from copy import deepcopy
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support, roc_auc_score

from scoring.calibration import (
    CONFORMAL_METHODS,
    conformal_evaluate,
    expected_calibration_error,
    reliability_bins,
)
from scoring.estimators import get_family
from scoring.features import slim, usable_text_fields
from scoring.inference import TrainedModel, limit_threads, predict_proba_labels

MIN_LABELS = 50
MIN_PER_CLASS = 5
SPLIT = (0.6, 0.2, 0.2)  # train, calibrate, test: oldest to newest
DEFAULT_ALPHA = 0.1


def _split_points(n: int) -> tuple[int, int]:
    n_train = int(n * SPLIT[0])
    n_cal = int(n * SPLIT[1])
    return n_train, n_train + n_cal


def _check_labels(labels: list[str], label_set: list[str], *, min_labels: int, min_per_class: int) -> None:
    unknown = sorted(set(labels) - set(label_set))
    if unknown:
        raise ValueError(f"labels outside the label set: {', '.join(map(repr, unknown[:10]))}")
    if len(labels) < min_labels:
        raise ValueError(f"not enough labels to train: {len(labels)} (need at least {min_labels})")
    counts = Counter(labels)
    enough = [label for label, c in counts.items() if c >= min_per_class]
    if len(enough) < 2:
        described = ", ".join(f"{label}: {counts.get(label, 0)}" for label in label_set)
        raise ValueError(
            f"need at least 2 classes with {min_per_class} or more labels each; have {described}"
        )


def _check_part(name: str, labels: list[str]) -> None:
    if len(set(labels)) < 2:
        only = next(iter(set(labels)), "none")
        raise ValueError(
            f"the {name} part of the time-ordered split has a single class ({only!r}, {len(labels)} labels); "
            "more labels of the other classes are needed"
        )


def evaluate(proba: np.ndarray, labels: list[str], label_set: list[str]) -> dict[str, Any]:
    """Quality of probabilities ``proba`` (columns in ``label_set`` order) against true ``labels``."""
    index = {label: k for k, label in enumerate(label_set)}
    y = np.array([index[label] for label in labels], dtype=int)
    pred = proba.argmax(axis=1)
    present = sorted(set(y.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=list(range(len(label_set))), zero_division=0
    )
    per_label = {
        label_set[k]: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k in range(len(label_set))
    }
    # Macro over the labels that occur in the evaluated rows, so an absent label does not count as a zero.
    macro_f1 = float(np.mean([f1[k] for k in present])) if present else 0.0
    roc_auc: float | None = None
    try:
        if len(label_set) == 2 and len(present) == 2:
            roc_auc = float(roc_auc_score(y == 1, proba[:, 1]))
        elif len(present) == len(label_set) > 2:
            roc_auc = float(roc_auc_score(y, proba, multi_class="ovr", labels=list(range(len(label_set)))))
    except ValueError:
        roc_auc = None
    majority = Counter(y.tolist()).most_common(1)[0][1] / len(y) if len(y) else 0.0
    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": macro_f1,
        "per_label": per_label,
        "log_loss": float(log_loss(y, np.clip(proba, 1e-15, 1.0), labels=list(range(len(label_set))))),
        "ece": expected_calibration_error(proba, y),
        "reliability": reliability_bins(proba, y),
        "roc_auc": roc_auc,
        "majority_baseline_accuracy": float(majority),
    }


def train(
    frame: pd.DataFrame,
    labels: list[str],
    label_set: list[str],
    spec: dict[str, Any],
    *,
    algorithm: str = "logreg",
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    conformal_method: str = "lac",
    min_labels: int = MIN_LABELS,
    min_per_class: int = MIN_PER_CLASS,
    threads: int | None = 1,
) -> TrainedModel:
    """Fit, calibrate and evaluate a model. Raises ValueError, with a message meant for people, when the
    labels cannot support a model (too few, a single class, an unknown algorithm).

    ``threads`` bounds OpenMP/BLAS threads (None: the libraries' default). One per process is the default
    because workers run one process per core, and oversubscribed OpenMP made small fits 10x slower.
    """
    if conformal_method not in CONFORMAL_METHODS:
        raise ValueError(f"unknown conformal method {conformal_method!r}; choose one of {', '.join(CONFORMAL_METHODS)}")
    if not 0 < alpha < 1:
        raise ValueError(f"the conformal level alpha must be between 0 and 1, not {alpha}")
    kwargs = {"algorithm": algorithm, "seed": seed, "alpha": alpha, "conformal_method": conformal_method,
              "min_labels": min_labels, "min_per_class": min_per_class}
    if threads is None:
        return _train(frame, labels, label_set, spec, **kwargs)
    with limit_threads(threads):
        return _train(frame, labels, label_set, spec, **kwargs)


def _train(
    frame: pd.DataFrame,
    labels: list[str],
    label_set: list[str],
    spec: dict[str, Any],
    *,
    algorithm: str,
    seed: int,
    alpha: float,
    conformal_method: str,
    min_labels: int,
    min_per_class: int,
) -> TrainedModel:
    family = get_family(algorithm)
    labels = [str(label) for label in labels]
    if len(frame) != len(labels):
        raise ValueError(f"{len(frame)} rows but {len(labels)} labels")
    _check_labels(labels, label_set, min_labels=min_labels, min_per_class=min_per_class)
    n = len(labels)
    cut_train, cut_cal = _split_points(n)
    parts = {
        "training": (slice(0, cut_train)),
        "calibration": (slice(cut_train, cut_cal)),
        "test": (slice(cut_cal, n)),
    }
    for name, part in parts.items():
        _check_part(name, labels[part])

    train_frame = frame.iloc[parts["training"]].reset_index(drop=True)
    spec = deepcopy(spec)
    usable = usable_text_fields(train_frame, spec)
    for name in [t for t in spec["text"] if t not in usable]:
        spec["ignored"].append({"name": name, "reason": "text field with no words in the training part"})
    spec["text"] = usable

    started = time.perf_counter()
    estimator = family.build(spec, seed=seed)
    with warnings.catch_warnings():
        # lbfgs may stop a hair short of its tolerance; the held-out metrics are what we judge it by.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(train_frame, np.array(labels[parts["training"]]))
    slim(estimator.named_steps["features"])
    fit_seconds = time.perf_counter() - started

    # Calibration rows whose label the model never saw in training cannot be calibrated against.
    known = {str(c) for c in estimator.classes_}
    cal_frame = frame.iloc[parts["calibration"]].reset_index(drop=True)
    cal_labels = np.array(labels[parts["calibration"]])
    keep = np.isin(cal_labels, list(known))
    # Calibrate the classifier step on features, so scoring computes features once for probabilities and
    # explanations alike.
    cal_X = estimator.named_steps["features"].transform(cal_frame[keep].reset_index(drop=True))
    calibrated, calibration = family.calibrate(estimator.named_steps["model"], cal_X, cal_labels[keep])
    method = calibration["method"]

    model = TrainedModel(
        algorithm=algorithm,
        params=family.params(seed=seed),
        spec=spec,
        label_set=list(label_set),
        pipeline=estimator,
        calibrated=calibrated,
        calibration={**calibration, "n": int(keep.sum()), "dropped_unseen_labels": int((~keep).sum())},
    )
    test_frame = frame.iloc[parts["test"]].reset_index(drop=True)
    test_labels = labels[parts["test"]]
    proba = predict_proba_labels(model, test_frame, label_set)
    metrics = evaluate(proba, test_labels, label_set)
    index = {label: k for k, label in enumerate(label_set)}
    y_test = np.array([index[lab] for lab in test_labels], dtype=int)
    conformal = conformal_evaluate(proba, y_test, alpha=alpha, method=conformal_method)
    model.conformal = {"method": conformal_method, "alpha": alpha, "qhat": conformal["qhat"]}
    metrics["conformal"] = conformal
    metrics["calibration_method"] = method
    if "temperature" in calibration:
        metrics["temperature"] = calibration["temperature"]
    metrics["split"] = {
        "order": "time (input order)",
        "training": cut_train,
        "calibration": cut_cal - cut_train,
        "test": n - cut_cal,
    }
    metrics["class_counts"] = {label: int(c) for label, c in Counter(labels).items()}
    metrics["fit_seconds"] = round(fit_seconds, 3)
    model.metrics = metrics
    model.test_index = list(range(cut_cal, n))
    model.test_proba = proba
    return model


def heldout_evidence(model: TrainedModel, labels: list[str], label_set: list[str]) -> dict[str, np.ndarray]:
    """What selective risk control needs from the final held-out part, and nothing else: per row the top
    label's calibrated confidence, the top label (index into ``label_set``) and whether it was right. Neither
    the model nor its calibrator saw these rows. ``labels`` are the training input's labels (all rows)."""
    if model.test_proba is None:
        raise ValueError("the model carries no held-out probabilities")
    index = {label: k for k, label in enumerate(label_set)}
    y = np.array([index[str(labels[i])] for i in model.test_index], dtype=np.int64)
    top = model.test_proba.argmax(axis=1)
    return {
        "confidence": model.test_proba.max(axis=1).astype(np.float64),
        "top_label": top.astype(np.int16),
        "correct": top == y,
        # Fixed-width unicode, not objects: loadable without pickle.
        "label_set": np.asarray([str(x) for x in label_set], dtype=str),
    }


CROSSFIT_MIN_FOLDS = 2


def crossfit_evidence(
    frame: pd.DataFrame,
    labels: list[str],
    label_set: list[str],
    spec: dict[str, Any],
    *,
    folds: int,
    algorithm: str = "logreg",
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    conformal_method: str = "lac",
    min_labels: int = MIN_LABELS,
    min_per_class: int = MIN_PER_CLASS,
    threads: int | None = 1,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Out-of-fold evidence for selective risk control: every label gets a confidence from a model that never
    saw it, so all labels (not only the newest fifth) can back the thresholds.

    The labels (in time order) are cut into ``folds`` contiguous blocks; for each block the same ``train`` that
    makes the shipped model (fit, calibration, conformal threshold) runs on the other blocks, and the block is
    scored by that model. The pooled out-of-fold rows are returned in the shape of ``heldout_evidence`` plus
    ``fold`` (the block of each row), with a record per fold. Contiguous blocks rather than a shuffle: a block's
    model has not seen the block's stretch of time, so drift makes this evidence more pessimistic, not less.

    The assumption this rests on (documented with the stored evidence): the shipped model, trained by the same
    procedure on all the labels, errs at any confidence threshold no more often than the fold models, trained on
    ``(folds - 1) / folds`` of them; and the pooled out-of-fold errors are treated as independent draws (they
    are exchangeable, though the fold models share training rows). This is the usual cross-fitting trade:
    every label counts as evidence at the price of a guarantee that holds for the procedure rather than exactly
    for the one fitted model. Raises ValueError (with a reason for people) when a fold cannot be trained.
    """
    labels = [str(label) for label in labels]
    n = len(labels)
    if folds < CROSSFIT_MIN_FOLDS:
        raise ValueError(f"cross-fitting needs at least {CROSSFIT_MIN_FOLDS} folds, not {folds}")
    if len(frame) != n:
        raise ValueError(f"{len(frame)} rows but {n} labels")
    index = {label: k for k, label in enumerate(label_set)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    cuts = np.linspace(0, n, folds + 1).astype(int)
    proba = np.zeros((n, len(label_set)))
    fold_of = np.zeros(n, dtype=np.int16)
    record: list[dict[str, Any]] = []
    for k in range(folds):
        lo, hi = int(cuts[k]), int(cuts[k + 1])
        rest = np.r_[0:lo, hi:n]
        try:
            model = train(frame.iloc[rest].reset_index(drop=True), [labels[i] for i in rest], label_set, spec,
                          algorithm=algorithm, seed=seed, alpha=alpha, conformal_method=conformal_method,
                          min_labels=min_labels, min_per_class=min_per_class, threads=threads)
        except ValueError as exc:
            raise ValueError(f"fold {k + 1} of {folds} (rows {lo}-{hi - 1} held out) cannot be trained: {exc}") \
                from exc
        with limit_threads(1):
            proba[lo:hi] = predict_proba_labels(model, frame.iloc[lo:hi].reset_index(drop=True), label_set)
        fold_of[lo:hi] = k
        top = proba[lo:hi].argmax(axis=1)
        record.append({"fold": k + 1, "heldout_rows": [lo, hi - 1], "n_heldout": hi - lo, "n_trained": len(rest),
                       "heldout_accuracy": round(float((top == y[lo:hi]).mean()), 4) if hi > lo else None})
    top = proba.argmax(axis=1)
    evidence = {
        "confidence": proba.max(axis=1).astype(np.float64),
        "top_label": top.astype(np.int16),
        "correct": top == y,
        "label_set": np.asarray([str(x) for x in label_set], dtype=str),
        "fold": fold_of,
    }
    return evidence, {"folds": folds, "n": n, "per_fold": record}


def evaluate_on(model: TrainedModel, frame: pd.DataFrame, labels: list[str], label_set: list[str]) -> dict[str, Any]:
    """Metrics of any trained model on given rows (e.g. the champion on a candidate's held-out part)."""
    with limit_threads(1):
        proba = predict_proba_labels(model, frame, label_set)
    return evaluate(proba, [str(x) for x in labels], label_set)
