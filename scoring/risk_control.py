"""Selective risk control: confidence thresholds whose auto-decision error is bounded with stated confidence.

Pure module (numpy + scipy, no Django) so training, the policy simulator and tests share one rule.

The promise
-----------
Given held-out items (never training items) with the model's top-label confidence, its top label and whether that
label was right, ``choose_thresholds`` picks, per predicted label ``l``, a threshold ``t_l`` such that, with
probability at least ``1 - delta`` over the draw of the held-out set,

    P(top label wrong | top label = l, confidence >= t_l) <= target_error    for every label l at once,

and hence the error among *all* auto-decided items (a mixture of the per-label errors) is at most ``target_error``.

How (Learn-then-Test with fixed-sequence testing)
-------------------------------------------------
For each label, candidate thresholds are scanned from high to low in an order fixed before looking at correctness.
Each candidate ``t`` is the hypothesis test ``H_t: error(t) > target_error``; its p-value comes from the exact
binomial tail, i.e. we reject when the one-sided Clopper-Pearson upper bound at level ``1 - delta_l`` of the error
among the held-out items the threshold would auto-decide is ``<= target_error``. We accept thresholds while the
bound holds and stop at the first failure. Fixed-sequence testing controls the family-wise error rate at
``delta_l`` with no Bonferroni penalty for the number of thresholds tried (each hypothesis is only tested when all
earlier ones were rejected). The lowest accepted threshold is returned, since it auto-decides the most items.
Labels get ``delta_l = delta / len(label_set)`` (Bonferroni across labels, fixed in advance), which makes the
per-label statements hold simultaneously; with ``per_label=False`` one shared threshold is tested on pooled items
at level ``delta``.

Where the sequence starts is chosen from the confidences alone (never from correctness), so it spends no error
budget: candidates that would auto-decide fewer than ``min_auto`` held-out items, or so few that even zero errors could
not bring the bound under ``target_error``, are not tested. With ``start="calibrated"`` (the default) the sequence
starts at the first candidate whose test would still pass if the errors were the number the model's own confidences
predict (the sum of ``1 - confidence``) plus a margin of one standard deviation and one error (or, when no candidate
qualifies, at the candidate where that predicted bound is lowest). A fixed
sequence stops at its first failure, so starting where a single unlucky error among very few items would fail the
test (a tiny, hopeless first test) would throw away every lower threshold; starting where the test has power
avoids that without looking at the labels. Since the number of auto-decided items
grows as the threshold falls, the skipped candidates are a prefix of the sequence.

Assumptions
-----------
* Held-out items and future items are exchangeable (same distribution, drawn the same way; no drift). Labels the
  model trained on are biased (overconfident) evidence and must not be passed in.
* Correctness indicators of the held-out items are independent given the selection (i.i.d. sampling).
* The guarantee is over the draw of the held-out set: in at most a ``delta`` fraction of such draws may the true
  error exceed ``target_error``; it says nothing about a single small batch of future items.

Where the held-out items come from
----------------------------------
Either the newest 20% of the labels, which the shipped model never saw (``training.heldout_evidence``), or, where
labels are few, every label scored out of fold (``training.crossfit_evidence``: K contiguous time blocks, each
scored by a model trained the same way on the other blocks). Cross-fitting makes K times more evidence (a rare
label that had ~100 held-out items gets ~500) at the price of two further assumptions, stored with the evidence:
the shipped model, trained by the same procedure on all labels, errs at any threshold no more often than the fold
models trained on (K-1)/K of them; and the pooled out-of-fold errors are treated as independent draws (the fold
models share training rows, so they are exchangeable rather than strictly independent). The bound then holds for
the training procedure rather than exactly for the one fitted model. ``scoring.services`` picks the source and
records which labels were used (count, id range, hash), the folds and the assumption with the model version.

A label for which no threshold is supported gets no threshold (nothing with that top label is auto-decided), and the
evidence says why. Note that a singleton conformal set is *not* such a promise: conformal sets bound coverage,
not the error among items decided alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist

METHOD = "learn-then-test: fixed-sequence testing, Clopper-Pearson upper bound"


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided upper confidence bound at level 1 - delta for a binomial proportion (errors of n)."""
    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta_dist.ppf(1.0 - delta, errors + 1, n - errors))


def default_grid(n_labels: int) -> np.ndarray:
    """Candidate thresholds, descending: fine near 1 (where confident models live) and a regular grid below."""
    floor = 1.0 / max(n_labels, 1)
    regular = np.linspace(floor, 1.0, 201)
    near_one = 1.0 - np.logspace(-5, -1, 41)
    grid = np.unique(np.round(np.concatenate([regular, near_one, [1.0]]), 8))
    return grid[::-1]


@dataclass
class LabelEvidence:
    threshold: float | None
    n_heldout: int  # held-out items with this top label (or all items when shared)
    n_auto: int  # of them at or above the chosen threshold
    errors: int
    bound: float | None  # Clopper-Pearson upper bound at the chosen threshold
    tested: int  # hypotheses tested in the fixed sequence (including the failing one)
    reason: str | None = None
    failed_at: dict[str, Any] | None = None  # the first rejected candidate, for the record


@dataclass
class RiskControlResult:
    target_error: float
    delta: float
    thresholds: dict[str, float]
    evidence: dict[str, Any]
    reason: str | None
    per_label: dict[str, LabelEvidence] = field(default_factory=dict)

    @property
    def confidence(self) -> float:
        return 1.0 - self.delta

    def to_json(self) -> dict[str, Any]:
        """The shape stored in ModelVersion.risk_control."""
        return {
            "target_error": self.target_error,
            "confidence": round(1.0 - self.delta, 10),
            "thresholds": dict(self.thresholds),
            "evidence": self.evidence,
            "reason": self.reason,
        }


def _validate(confidences: np.ndarray, correct: np.ndarray, top_labels: np.ndarray, target_error: float,
              delta: float, min_auto: int) -> None:
    if not (confidences.shape == correct.shape == top_labels.shape) or confidences.ndim != 1:
        raise ValueError("confidences, correct and top_labels must be 1-d arrays of the same length")
    if not 0.0 < target_error < 1.0:
        raise ValueError("target_error must be in (0, 1)")
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must be in (0, 1)")
    if min_auto < 1:
        raise ValueError("min_auto must be >= 1")
    if confidences.size and (np.nanmin(confidences) < 0 or np.nanmax(confidences) > 1 + 1e-9):
        raise ValueError("confidences must lie in [0, 1]")


def _calibrated_start(candidates: list[tuple[float, int]], cum_expected: np.ndarray, *, target_error: float,
                      delta: float) -> int:
    """Index of the first candidate whose test would pass with the errors the confidences predict plus a margin
    (one standard deviation and one error); failing that, the candidate where that predicted bound is lowest.
    Uses confidences only, never correctness."""
    predicted = []
    for _t, n in candidates:
        expected = float(cum_expected[n - 1])
        slack = min(n, math.ceil(expected + math.sqrt(expected) + 1.0))
        predicted.append(clopper_pearson_upper(slack, n, delta))
    for index, bound in enumerate(predicted):
        if bound <= target_error:
            return index
    return int(np.argmin(predicted)) if predicted else 0


def _scan(conf: np.ndarray, wrong: np.ndarray, grid: np.ndarray, *, target_error: float, delta: float,
          min_auto: int, start: str = "calibrated") -> LabelEvidence:
    """Fixed-sequence test over ``grid`` (descending) for one group of items."""
    n_heldout = int(conf.size)
    # Smallest n at which zero errors pass: (1 - eps) ** n <= delta. Label-free, so skipping below it is free.
    # Capped: a subnormal target_error makes the quotient infinite and ceil() would raise (found by schemathesis).
    n_floor = max(min_auto, math.ceil(min(math.log(delta) / math.log1p(-target_error), 1e15)))
    if n_heldout < n_floor:
        return LabelEvidence(None, n_heldout, 0, 0, None, 0,
                             reason=(f"only {n_heldout} held-out labels; at least {n_floor} are needed "
                                     f"for a bound of {target_error:g} at this confidence"))
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    cum_wrong = np.cumsum(wrong[order].astype(np.int64))
    # Errors the confidences themselves predict among the top n items (label-free).
    cum_expected = np.cumsum(1.0 - conf_sorted)
    # n auto-decided at threshold t = items with conf >= t (vectorised over the grid).
    n_at = np.searchsorted(-conf_sorted, -grid, side="right")
    # Label-free skip: candidates with too few items are not tested and spend no error budget.
    candidates = [(float(t), int(n)) for t, n in zip(grid, n_at, strict=True) if n >= n_floor]
    first = _calibrated_start(candidates, cum_expected, target_error=target_error, delta=delta) \
        if start == "calibrated" else 0
    best: LabelEvidence | None = None
    tested = 0
    for t, n in candidates[first:]:
        k = int(cum_wrong[n - 1])
        tested += 1
        ub = clopper_pearson_upper(k, n, delta)
        if ub > target_error:
            failed = {"threshold": t, "n_auto": n, "errors": k, "bound": ub}
            if best is None:
                return LabelEvidence(
                    None, n_heldout, 0, 0, None, tested,
                    reason=(f"no threshold supported: at the first candidate {t:.4g} ({n} items, {k} wrong) "
                            f"the upper bound {ub:.4f} exceeds the target {target_error:g}"),
                    failed_at=failed)
            best.tested = tested
            best.failed_at = failed
            return best
        best = LabelEvidence(t, n_heldout, n, k, ub, tested)  # descending grid: lowest accepted so far
    if best is None:
        return LabelEvidence(None, n_heldout, 0, 0, None, 0,
                             reason=(f"no candidate threshold auto-decides at least {n_floor} held-out items "
                                     f"(needed for a bound of {target_error:g} even with zero errors)"))
    best.tested = tested
    return best


def choose_thresholds(
    confidences: np.ndarray,
    correct: np.ndarray,
    top_labels: np.ndarray,
    *,
    label_set: list[str],
    target_error: float,
    delta: float,
    grid: np.ndarray | None = None,
    min_auto: int = 30,
    per_label: bool = True,
    start: str = "calibrated",
) -> RiskControlResult:
    """Thresholds per label whose auto-decision error is <= target_error with probability >= 1 - delta.

    confidences: top-label probability per held-out item; correct: whether the top label equals the human label;
    top_labels: the predicted label. Pass only labels the model did not train on (see the module docstring for the
    guarantee and its assumptions). Labels without a supported threshold are absent from ``thresholds``.
    """
    conf = np.asarray(confidences, dtype=float).ravel()
    corr = np.asarray(correct, dtype=bool).ravel()
    tops = np.asarray(top_labels).astype(str).ravel()
    _validate(conf, corr, tops, target_error, delta, min_auto)
    if start not in ("calibrated", "first"):
        raise ValueError('start must be "calibrated" or "first"')
    labels = [str(x) for x in label_set]
    g = default_grid(len(labels)) if grid is None else np.unique(np.asarray(grid, dtype=float))[::-1]
    wrong = ~corr
    finite = np.isfinite(conf)

    per: dict[str, LabelEvidence] = {}
    thresholds: dict[str, float] = {}
    if per_label:
        delta_each = delta / max(len(labels), 1)
        for label in labels:
            mask = (tops == label) & finite
            ev = _scan(conf[mask], wrong[mask], g, target_error=target_error, delta=delta_each, min_auto=min_auto,
                       start=start)
            per[label] = ev
            if ev.threshold is not None:
                thresholds[label] = ev.threshold
    else:
        delta_each = delta
        known = np.isin(tops, labels) & finite
        ev = _scan(conf[known], wrong[known], g, target_error=target_error, delta=delta, min_auto=min_auto,
                   start=start)
        for label in labels:
            per[label] = ev
            if ev.threshold is not None:
                thresholds[label] = ev.threshold

    reason: str | None = None
    if not thresholds:
        reasons = sorted({f"{lab}: {ev.reason}" for lab, ev in per.items() if ev.reason})
        reason = "no threshold is supported by the held-out labels; nothing is auto-decided"
        if reasons:
            reason += " (" + "; ".join(reasons) + ")"

    auto_n = sum(per[lab].n_auto for lab in thresholds) if per_label else (next(iter(per.values())).n_auto
                                                                             if thresholds else 0)
    auto_err = sum(per[lab].errors for lab in thresholds) if per_label else (next(iter(per.values())).errors
                                                                             if thresholds else 0)
    evidence: dict[str, Any] = {
        "method": METHOD,
        "per_label_thresholds": per_label,
        "n_heldout": int(conf.size),
        "delta_per_test_family": delta_each,
        "min_auto": min_auto,
        "grid_size": int(g.size),
        "start": start,
        "n_auto": int(auto_n),
        "errors_auto": int(auto_err),
        "empirical_auto_error": (auto_err / auto_n) if auto_n else None,
        "per_label": {lab: _clean(asdict(ev)) for lab, ev in per.items()},
    }
    return RiskControlResult(target_error=float(target_error), delta=float(delta), thresholds=thresholds,
                             evidence=evidence, reason=reason, per_label=per)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe floats (no NaN/inf, which PostgreSQL JSONB rejects)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        elif isinstance(v, dict):
            out[k] = _clean(v)
        else:
            out[k] = v
    return out
