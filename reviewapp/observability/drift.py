"""Population stability index per feature: pure functions over frames (no Django imports).

PSI = sum over bins of (actual - expected) * ln(actual / expected), with shares, not counts. Numeric
features are binned at the reference data's quantiles; categorical ones by category (the reference's most
frequent categories, the rest folded into "(other)"). Missing values get a bin of their own in both, so a
field that stops arriving is drift too. Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Floor for empty bins: keeps the log finite and bounds one empty bin's contribution.
EPSILON = 1e-4
MISSING = "(missing)"
OTHER = "(other)"


@dataclass(frozen=True)
class BinShare:
    bin: str
    expected: float
    actual: float


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    kind: str  # "numeric" or "categorical"
    psi: float
    bins: list[BinShare] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "psi": round(self.psi, 6),
            "bins": [{"bin": b.bin, "expected": round(b.expected, 6), "actual": round(b.actual, 6)}
                     for b in self.bins],
        }


def psi(expected: Sequence[float], actual: Sequence[float], *, epsilon: float = EPSILON) -> float:
    """PSI of two distributions over the same bins (counts or shares; each is normalised)."""
    e = np.asarray(expected, dtype="float64")
    a = np.asarray(actual, dtype="float64")
    if e.shape != a.shape or e.size == 0:
        raise ValueError("expected and actual need the same, non-empty bins")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("both distributions need at least one observation")
    e = np.maximum(e / e.sum(), epsilon)
    a = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def quantile_edges(reference: Sequence[float] | np.ndarray, *, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates dropped, so discrete features get fewer bins)."""
    values = np.asarray(reference, dtype="float64")
    values = values[np.isfinite(values)]
    if values.size == 0 or bins < 2:
        return np.array([], dtype="float64")
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_counts(values: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: (-inf, e0], (e0, e1], ..., (ek, inf), then missing."""
    arr = np.asarray(values, dtype="float64")
    finite = np.isfinite(arr)
    idx = np.searchsorted(edges, arr[finite], side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype("float64")
    return np.append(counts, float((~finite).sum()))


def numeric_bin_names(edges: np.ndarray) -> list[str]:
    if edges.size == 0:
        return ["all values", MISSING]
    names = [f"≤ {_fmt(edges[0])}"]
    names += [f"{_fmt(lo)} – {_fmt(hi)}" for lo, hi in itertools.pairwise(edges)]
    names.append(f"> {_fmt(edges[-1])}")
    return [*names, MISSING]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def categorical_counts(values: Sequence[Any] | pd.Series, categories: list[str]) -> np.ndarray:
    """Counts per category, then "(other)", then missing (None/NaN/empty string)."""
    series = pd.Series(values, dtype="object")
    missing = series.isna() | (series.astype(str) == "")
    text = series[~missing].astype(str)
    counts = text.value_counts()
    known = [float(counts.get(c, 0)) for c in categories]
    other = float(len(text) - sum(known))
    return np.array([*known, other, float(missing.sum())], dtype="float64")


def reference_categories(values: Sequence[Any] | pd.Series, *, max_categories: int = 20) -> list[str]:
    series = pd.Series(values, dtype="object")
    series = series[~(series.isna() | (series.astype(str) == ""))].astype(str)
    return [str(c) for c in series.value_counts().index[:max_categories]]


def numeric_drift(name: str, reference: Any, recent: Any, *, bins: int = 10) -> FeatureDrift:
    edges = quantile_edges(np.asarray(reference, dtype="float64"), bins=bins)
    expected = numeric_counts(reference, edges)
    actual = numeric_counts(recent, edges)
    return _feature(name, "numeric", numeric_bin_names(edges), expected, actual)


def categorical_drift(name: str, reference: Any, recent: Any, *, max_categories: int = 20) -> FeatureDrift:
    categories = reference_categories(reference, max_categories=max_categories)
    expected = categorical_counts(reference, categories)
    actual = categorical_counts(recent, categories)
    return _feature(name, "categorical", [*categories, OTHER, MISSING], expected, actual)


def _feature(name: str, kind: str, names: list[str], expected: np.ndarray, actual: np.ndarray) -> FeatureDrift:
    value = psi(expected, actual)
    e_share = expected / expected.sum()
    a_share = actual / actual.sum()
    # Bins empty on both sides say nothing; leave them out of the stored report.
    shares = [BinShare(n, float(e), float(a)) for n, e, a in zip(names, e_share, a_share, strict=True) if e or a]
    return FeatureDrift(name, kind, value, shares)


def frame_drift(
    reference: pd.DataFrame,
    recent: pd.DataFrame,
    *,
    numeric: list[str],
    categorical: list[str],
    bins: int = 10,
    max_categories: int = 20,
) -> list[FeatureDrift]:
    """PSI of every listed column, most drifted first. Both frames need at least one row."""
    if reference.empty or recent.empty:
        raise ValueError("both frames need at least one row")
    out = [numeric_drift(c, reference[c], recent[c], bins=bins) for c in numeric]
    out += [categorical_drift(c, reference[c], recent[c], max_categories=max_categories) for c in categorical]
    return sorted(out, key=lambda f: (-f.psi, f.name))
