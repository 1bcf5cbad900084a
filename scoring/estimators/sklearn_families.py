"""scikit-learn families: logistic regression (exact linear explanations) and histogram gradient boosting
(occlusion explanations). No Django imports."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from scoring.calibration import calibrate, choose_method
from scoring.features import build_preprocessor, feature_group, frame_from_payloads, spec_fields


def _round(value: float) -> float:
    return round(float(value), 4)


def _top_pairs(names: list[str], values: np.ndarray, k: int) -> list[list[Any]]:
    order = np.argsort(-np.abs(values), kind="stable")[:k]
    return [[names[j], _round(values[j])] for j in order if values[j] != 0]


class _SklearnCalibration:
    stores_weights = False

    def calibrate(self, fitted: Any, X_cal: Any, y_cal: np.ndarray) -> tuple[Any, dict[str, Any]]:
        """Isotonic with enough held-out labels, Platt otherwise (see scoring.calibration)."""
        method = choose_method(y_cal)
        return calibrate(fitted, X_cal, y_cal, method=method), {"method": method}


class LogisticRegressionFamily(_SklearnCalibration):
    name = "logreg"
    title = "Logistic regression (scikit-learn)"

    def params(self, *, seed: int) -> dict[str, Any]:
        return {"C": 1.0, "max_iter": 2000, "solver": "lbfgs", "class_weight": None, "seed": seed}

    def build(self, spec: dict[str, Any], *, seed: int) -> Pipeline:
        p = self.params(seed=seed)
        model = LogisticRegression(
            C=p["C"], max_iter=p["max_iter"], solver=p["solver"], class_weight=p["class_weight"], random_state=seed
        )
        return Pipeline([("features", build_preprocessor(spec)), ("model", model)])

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
        """Exact: each field's share of the log-odds of the target class (binary) or of its logit against the
        mean logit (multinomial). Numeric fields are measured from their training mean (standardised), one-hot
        categories and tokens from absence."""
        spec = model.spec
        features, linear = model.pipeline.named_steps["features"], model.pipeline.named_steps["model"]
        X = sparse.csr_matrix(X) if not sparse.issparse(X) else X.tocsr()
        out_names = list(features.get_feature_names_out())
        fields = spec_fields(spec)
        field_index = {f: i for i, f in enumerate(fields)}
        groups = [feature_group(n, spec) for n in out_names]
        # Column -> field aggregation matrix, so per-field sums are one sparse product for the whole batch.
        rows = [j for j, (f, _) in enumerate(groups) if f in field_index]
        cols = [field_index[groups[j][0]] for j in rows]
        G = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(out_names), len(fields)))
        token_cols = np.array([tok is not None for _, tok in groups])

        coef = np.asarray(linear.coef_)
        intercept = np.asarray(linear.intercept_)
        n = X.shape[0]
        # Per-row weight vector: one row of W per distinct target.
        if coef.shape[0] == 1:
            weights = {0: -coef[0], 1: coef[0]}
            bases = {0: -intercept[0], 1: intercept[0]}
        else:
            centred = coef - coef.mean(axis=0, keepdims=True)
            icentred = intercept - intercept.mean()
            weights = {c: centred[c] for c in range(coef.shape[0])}
            bases = {c: icentred[c] for c in range(coef.shape[0])}
        contrib = sparse.csr_matrix((n, X.shape[1]))
        pieces = []
        order = []
        for c in np.unique(target):
            idx = np.flatnonzero(target == c)
            pieces.append(X[idx].multiply(weights[int(c)]).tocsr())
            order.append(idx)
        if pieces:
            stacked = sparse.vstack(pieces).tocsr()
            inverse = np.empty(n, dtype=int)
            inverse[np.concatenate(order)] = np.arange(n)
            contrib = stacked[inverse]
        per_field = np.asarray((contrib @ G).todense()) if n else np.zeros((0, len(fields)))
        text_part = contrib[:, np.flatnonzero(token_cols)].tocsr() if token_cols.any() else None
        text_names = [f"{groups[j][0]}:{groups[j][1]}" for j in np.flatnonzero(token_cols)]
        classes = list(linear.classes_)
        explanations = []
        for i in range(n):
            entry: dict[str, Any] = {
                "method": "linear",
                "target": str(classes[int(target[i])]),
                "base": _round(bases[int(target[i])]),
                "features": _top_pairs(fields, per_field[i], top_k),
            }
            if text_part is not None:
                start, end = text_part.indptr[i], text_part.indptr[i + 1]
                vals = text_part.data[start:end]
                idxs = text_part.indices[start:end]
                top = np.argsort(-np.abs(vals), kind="stable")[:top_tokens]
                entry["tokens"] = [[text_names[idxs[t]], _round(vals[t])] for t in top if vals[t] != 0]
            explanations.append(entry)
        return explanations


class HistGradientBoostingFamily(_SklearnCalibration):
    name = "hgb"
    title = "Histogram gradient boosting (scikit-learn)"

    def params(self, *, seed: int) -> dict[str, Any]:
        # Small trees and a slow rate: labeled history is often a few thousand rows with a rare class.
        return {"max_iter": 150, "learning_rate": 0.05, "max_leaf_nodes": 15, "min_samples_leaf": 40,
                "l2_regularization": 1.0, "early_stopping": False, "seed": seed}

    def build(self, spec: dict[str, Any], *, seed: int) -> Pipeline:
        p = self.params(seed=seed)
        model = HistGradientBoostingClassifier(
            max_iter=p["max_iter"], learning_rate=p["learning_rate"], max_leaf_nodes=p["max_leaf_nodes"],
            min_samples_leaf=p["min_samples_leaf"], l2_regularization=p["l2_regularization"],
            early_stopping=p["early_stopping"], random_state=seed,
        )
        # Trees need dense arrays: text is bounded harder there.
        return Pipeline([("features", build_preprocessor(spec, dense=True)), ("model", model)])

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
        """Occlusion on the calibrated model: how much the target class's probability drops when one field
        is blanked (numeric to the training median via the imputer, categories and text to empty, booleans to
        false). Blanking is done on the feature matrix: every output column depends on its own field only, so
        replacing a field's columns with those of a blank row equals blanking the field in the payload and
        building features again, without building them again. One batched predict per field."""
        n = len(frame)
        spec = model.spec
        fields = spec_fields(spec)
        if n == 0:
            return []
        features = model.pipeline.named_steps["features"]
        X = np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float64)
        blank = model.transform(frame_from_payloads([{}], spec))
        blank = np.asarray(blank.toarray() if sparse.issparse(blank) else blank, dtype=np.float64)[0]
        groups = [feature_group(name, spec)[0] for name in features.get_feature_names_out()]
        rows = np.arange(n)
        base = model.calibrated.predict_proba(X)[rows, target]
        drops = np.zeros((n, len(fields)))
        for j, field in enumerate(fields):
            cols = [k for k, g in enumerate(groups) if g == field]
            if not cols:
                continue
            occluded = X.copy()
            occluded[:, cols] = blank[cols]
            drops[:, j] = base - model.calibrated.predict_proba(occluded)[rows, target]
        classes = list(model.classes)
        return [
            {"method": "occlusion", "target": str(classes[int(target[i])]), "base": _round(base[i]),
             "features": _top_pairs(fields, drops[i], top_k)}
            for i in range(n)
        ]


LOGREG = LogisticRegressionFamily()
HGB = HistGradientBoostingFamily()
