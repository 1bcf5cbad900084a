"""Features from a source's JSON Schema: pure functions over pandas frames (no Django imports).

A *feature spec* is a small JSON-serialisable dict derived from the schema. It is stored with every model
version, so the columns a model was fitted on can always be rebuilt from raw payloads, whatever schema
version later items carry (missing fields become NaN / "").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils import check_array

SPEC_VERSION = 1
# Strings up to this declared length are treated as categories; longer ones belong in text_fields.
SHORT_STRING_MAX_LENGTH = 200
# Bounds that keep the design matrix (and the artifact) small whatever the data.
DEFAULT_TEXT_MAX_FEATURES = 5000
DENSE_TEXT_MAX_FEATURES = 100
FREE_CATEGORY_MAX_CATEGORIES = 50
DATETIME_PARTS = ("hour", "dayofweek", "month")
# Hashed text for the embedding-bag text model: buckets per text field.
HASH_BITS = 15


def _json_type(prop: dict[str, Any]) -> str | None:
    """The one non-null JSON type of a property, or None when it is absent or ambiguous."""
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in prop:
        return "string"
    return kind if isinstance(kind, str) else None


def feature_spec_from_schema(
    json_schema: dict[str, Any],
    *,
    id_field: str,
    label_field: str = "",
    text_fields: list[str] | tuple[str, ...] = (),
    text_max_features: int = DEFAULT_TEXT_MAX_FEATURES,
) -> dict[str, Any]:
    """Classify every schema property as numeric, categorical, boolean, datetime or text (or ignored, with why)."""
    properties: dict[str, Any] = json_schema.get("properties") or {}
    spec: dict[str, Any] = {
        "version": SPEC_VERSION,
        "id_field": id_field,
        "label_field": label_field or "",
        "numeric": [],
        "categorical": [],
        "boolean": [],
        "datetime": [],
        "text": [],
        "ignored": [],
        "text_max_features": int(text_max_features),
    }
    text_set = set(text_fields)
    for name, prop in properties.items():
        prop = prop if isinstance(prop, dict) else {}
        if name in (id_field, label_field):
            continue
        if name in text_set:
            spec["text"].append(name)
            continue
        kind = _json_type(prop)
        if kind in ("number", "integer"):
            spec["numeric"].append(name)
        elif kind == "boolean":
            spec["boolean"].append(name)
        elif kind == "string":
            if prop.get("format") in ("date-time", "date"):
                spec["datetime"].append(name)
            elif "enum" in prop:
                spec["categorical"].append({"name": name, "enum": [str(v) for v in prop["enum"]]})
            elif int(prop.get("maxLength", 0) or 0) > SHORT_STRING_MAX_LENGTH:
                spec["ignored"].append({"name": name, "reason": "long free string: list it in text_fields to use it"})
            else:
                spec["categorical"].append({"name": name, "enum": None})
        else:
            spec["ignored"].append({"name": name, "reason": f"unsupported type {prop.get('type')!r}"})
    # Text fields named but absent from the schema are still read from payloads.
    for name in text_fields:
        if name not in spec["text"] and name not in (id_field, label_field):
            spec["text"].append(name)
    return spec


def spec_columns(spec: dict[str, Any]) -> list[str]:
    """The frame's columns, in a stable order."""
    cols = list(spec["numeric"])
    cols += [f"{name}__{part}" for name in spec.get("datetime", []) for part in DATETIME_PARTS]
    cols += [c["name"] for c in spec["categorical"]]
    cols += list(spec["boolean"])
    cols += list(spec["text"])
    return cols


def spec_fields(spec: dict[str, Any]) -> list[str]:
    """Payload fields the spec reads (for explanations grouped by field)."""
    return (
        list(spec["numeric"]) + list(spec.get("datetime", [])) + [c["name"] for c in spec["categorical"]]
        + list(spec["boolean"]) + list(spec["text"])
    )


_BOOL_STRINGS = {"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0, "yes": 1.0, "no": 0.0}


def _to_bool_float(value: Any) -> float:
    if isinstance(value, bool | np.bool_):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and value in (0, 1):
        return float(value)
    if isinstance(value, str):
        return _BOOL_STRINGS.get(value.strip().lower(), np.nan)
    return np.nan


def _floats(values: list[Any]) -> np.ndarray:
    """Numbers (or numeric strings) as float64; anything else (text, lists, objects) NaN; inf NaN too."""
    try:
        # The common case in one C loop: numbers, numeric strings and None (None becomes NaN).
        out = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = np.array([_float_or_nan(v) for v in values], dtype=np.float64)
    # Numeric overflow (1e400) arrives as inf; treat it as missing rather than crash the scaler.
    out[~np.isfinite(out)] = np.nan
    return out


def _float_or_nan(value: Any) -> float:
    if isinstance(value, bool | int | float | np.number):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return np.nan
    return np.nan


def _strings(values: list[Any]) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]


def frame_from_payloads(payloads: list[dict[str, Any]], spec: dict[str, Any]) -> pd.DataFrame:
    """One row per payload with the spec's columns; missing or malformed values become NaN (or "" for strings).

    Built column by column from plain lists (one DataFrame construction at the end): pandas per-column
    operations cost ~0.1 ms each, which dominated single-item scoring."""
    records = [p if isinstance(p, dict) else {} for p in payloads]

    def column(name: str) -> list[Any]:
        return [r.get(name) for r in records]

    out: dict[str, Any] = {}
    for name in spec["numeric"]:
        out[name] = _floats(column(name))
    for name in spec.get("datetime", []):
        stamps = pd.to_datetime(pd.Series(column(name), dtype=object), errors="coerce", utc=True, format="ISO8601")
        for part in DATETIME_PARTS:
            out[f"{name}__{part}"] = getattr(stamps.dt, part).to_numpy(dtype=np.float64, na_value=np.nan)
    for cat in spec["categorical"]:
        out[cat["name"]] = np.array(_strings(column(cat["name"])), dtype=object)
    for name in spec["boolean"]:
        out[name] = np.array([_to_bool_float(v) for v in column(name)], dtype=np.float64)
    for name in spec["text"]:
        out[name] = np.array(_strings(column(name)), dtype=object)
    columns = spec_columns(spec)
    # No ``columns=``: with it pandas routes the dict through an object Series first. The columns were built in
    # spec order, so selecting them again would only copy the frame (a third of the cost of a single item); a
    # spec whose names collide still goes through the selection.
    frame = pd.DataFrame(out, index=pd.RangeIndex(len(records)))
    return frame if list(frame.columns) == columns else frame[columns]


def _tabular_transformers(spec: dict[str, Any], *, dense: bool) -> list[tuple[str, Any, Any]]:
    """Numeric (median impute, standardise; datetime parts included), categorical one-hot (unknown values are
    all-zero rows, never an error), boolean (missing is false)."""
    transformers: list[tuple[str, Any, Any]] = []
    numeric = list(spec["numeric"]) + [f"{n}__{p}" for n in spec.get("datetime", []) for p in DATETIME_PARTS]
    if numeric:
        transformers.append((
            "num",
            Pipeline([
                ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                ("scale", StandardScaler()),
            ]),
            numeric,
        ))
    fixed = [c["name"] for c in spec["categorical"] if c.get("enum")]
    free = [c["name"] for c in spec["categorical"] if not c.get("enum")]
    if fixed:
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=not dense), fixed))
    if free:
        # Free strings may have many values: keep the frequent ones, fold the rest (and unseen) together.
        transformers.append((
            "freecat",
            OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=FREE_CATEGORY_MAX_CATEGORIES,
                          sparse_output=not dense),
            free,
        ))
    if spec["boolean"]:
        transformers.append((
            "bool",
            SimpleImputer(strategy="constant", fill_value=0.0, keep_empty_features=True),
            list(spec["boolean"]),
        ))
    return transformers


def build_preprocessor(spec: dict[str, Any], *, dense: bool = False) -> ColumnTransformer:
    """The ColumnTransformer for a spec. ``dense`` bounds text features harder for models that need arrays."""
    transformers = _tabular_transformers(spec, dense=dense)
    max_features = DENSE_TEXT_MAX_FEATURES if dense else int(spec.get("text_max_features", DEFAULT_TEXT_MAX_FEATURES))
    for name in spec["text"]:
        transformers.append((
            f"text_{name}",
            TfidfVectorizer(max_features=max_features, ngram_range=(1, 2), sublinear_tf=True, dtype=np.float64),
            name,
        ))
    return ColumnTransformer(
        transformers, remainder="drop", sparse_threshold=0.0 if dense else 0.3, verbose_feature_names_out=True
    )


def build_hashed_preprocessor(spec: dict[str, Any], *, n_bits: int = HASH_BITS) -> ColumnTransformer:
    """Hashed text first (one block of ``2**n_bits`` columns per text field: unigrams and bigrams, l2-normalised
    counts, no vocabulary to store), then the dense tabular features. Always sparse. A model can split the output
    at ``hashed_text_width(spec)`` columns: text buckets left, tabular right."""
    transformers: list[tuple[str, Any, Any]] = [
        (f"hash_{name}", HashingVectorizer(n_features=2**n_bits, ngram_range=(1, 2), alternate_sign=False,
                                           norm="l2", dtype=np.float32), name)
        for name in spec["text"]
    ]
    transformers += _tabular_transformers(spec, dense=True)
    return ColumnTransformer(transformers, remainder="drop", sparse_threshold=1.0, verbose_feature_names_out=True)


def hashed_text_width(spec: dict[str, Any], *, n_bits: int = HASH_BITS) -> int:
    return len(spec["text"]) * 2**n_bits


def tabular_feature_names(preprocessor: ColumnTransformer) -> list[str]:
    """Output names of the fitted transformers other than hashed text, in output-column order."""
    parts = []
    for name, transformer, _ in preprocessor.transformers_:
        if name.startswith("hash_") or name == "remainder" or transformer == "drop":
            continue
        where = preprocessor.output_indices_[name]
        parts.append((where.start, [f"{name}__{n}" for n in transformer.get_feature_names_out()]))
    return [n for _, names in sorted(parts, key=lambda p: p[0]) for n in names]


def transform(preprocessor: ColumnTransformer, frame: pd.DataFrame) -> Any:
    """``preprocessor.transform(frame)`` without the ColumnTransformer's per-call machinery (validation of the
    frame, joblib dispatch, output containers), which cost more than the transforms themselves for small batches.
    Same transformers, same columns, same stacking rule (``sparse_output_`` decided at fit time), so the output
    is identical; anything but our own layout goes through the ColumnTransformer itself."""
    steps = getattr(preprocessor, "transformers_", None)
    if steps is None or getattr(preprocessor, "remainder", "drop") != "drop":
        return preprocessor.transform(frame)
    parts = []
    for name, transformer, columns in steps:
        if name == "remainder" or isinstance(transformer, str):
            if transformer == "drop":
                continue
            return preprocessor.transform(frame)  # "passthrough": not a layout we build
        fast = _fast_part(transformer, frame, columns)
        parts.append(transformer.transform(frame[columns]) if fast is None else fast)
    if preprocessor.sparse_output_:
        if all(sparse.issparse(X) or isinstance(X, np.ndarray) for X in parts):
            # Canonical CSR blocks let scipy stack along columns row by row instead of through COO and a sort; the
            # result is the same canonical CSR (dense blocks keep their nonzeros, as the COO route does).
            blocks = [X.tocsr() if sparse.issparse(X) else sparse.csr_matrix(X) for X in parts]
            if all(b.has_canonical_format for b in blocks):
                return sparse.hstack(blocks, format="csr")
        return sparse.hstack([check_array(X, accept_sparse=True, ensure_all_finite=False) for X in parts]).tocsr()
    return np.hstack([X.toarray() if sparse.issparse(X) else np.asarray(X) for X in parts])


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """One column's values (read-only use). ``frame[name]`` builds a Series (~50 us, several per item); pandas'
    own column accessor returns the array itself."""
    getter = getattr(frame, "_get_column_array", None)
    if getter is not None and frame.columns.is_unique:
        return getter(frame.columns.get_loc(name))
    return frame[name].to_numpy()


def _float_block(frame: pd.DataFrame, columns: list[str]) -> np.ndarray | None:
    """The columns as one float64 array (a copy, safe to modify), or None when a column is not float64."""
    arrays = [_column(frame, c) for c in columns]
    if any(a.dtype != np.float64 for a in arrays):
        return None
    return np.column_stack(arrays)


def _impute(imputer: SimpleImputer, X: np.ndarray) -> np.ndarray | None:
    """``SimpleImputer.transform`` for NaN-missing float input without indicator or dropped columns; else None."""
    missing = imputer.missing_values
    stats = getattr(imputer, "statistics_", None)
    if (type(imputer) is not SimpleImputer or imputer.add_indicator or stats is None
            or not (isinstance(missing, float) and missing != missing)
            or getattr(imputer, "_fill_dtype", None) != np.float64 or X.shape[1] != stats.shape[0]):
        return None
    stats = stats.astype(np.float64)  # as scikit-learn does (a constant fill is stored as objects)
    if not imputer.keep_empty_features and np.isnan(stats).any():
        return None  # scikit-learn would drop those columns
    mask = np.isnan(X)
    if np.isinf(X).any():
        return None  # scikit-learn refuses infinities (frame_from_payloads never makes them)
    if mask.any():
        X[mask] = np.broadcast_to(stats, X.shape)[mask]
    return X


def _scale(scaler: StandardScaler, X: np.ndarray) -> np.ndarray | None:
    """``StandardScaler.transform`` on a dense float64 array: the same in-place operations in the same order."""
    if type(scaler) is not StandardScaler or X.shape[1] != getattr(scaler, "n_features_in_", -1):
        return None
    if scaler.with_mean:
        X -= scaler.mean_
    if scaler.with_std:
        X /= scaler.scale_
    return X


def _one_hot(encoder: OneHotEncoder, frame: pd.DataFrame, columns: list[str]) -> Any:
    """``OneHotEncoder.transform`` for string columns with unknown values ignored (no drop, no infrequent
    categories): the same CSR built the same way (or its dense equivalent), without the per-call validation."""
    cats = getattr(encoder, "categories_", None)
    if (type(encoder) is not OneHotEncoder or cats is None or encoder.drop is not None
            or getattr(encoder, "_infrequent_enabled", True)
            or encoder.handle_unknown not in ("ignore", "infrequent_if_exist") or len(cats) != len(columns)
            or any(c.dtype != object for c in cats)):
        return None
    n = len(frame)
    X_int = np.zeros((n, len(columns)), dtype=int)
    X_mask = np.ones((n, len(columns)), dtype=bool)
    for j, (column, categories) in enumerate(zip(columns, cats, strict=True)):
        values = _column(frame, column).tolist()
        if any(type(v) is not str for v in values):
            return None
        position = {c: k for k, c in enumerate(categories.tolist())}
        for i, value in enumerate(values):
            k = position.get(value)
            if k is None:
                X_mask[i, j] = False
            else:
                X_int[i, j] = k
    feature_indices = np.cumsum([0] + [len(c) for c in cats])
    if not encoder.sparse_output:
        # What ``toarray()`` of the CSR below gives: a one per known value, zeros elsewhere.
        dense = np.zeros((n, int(feature_indices[-1])), dtype=encoder.dtype)
        rows, cols = np.nonzero(X_mask)
        dense[rows, (X_int + feature_indices[:-1])[rows, cols]] = 1
        return dense
    mask = X_mask.ravel()
    indices = (X_int + feature_indices[:-1]).ravel()[mask]
    indptr = np.empty(n + 1, dtype=int)
    indptr[0] = 0
    np.sum(X_mask, axis=1, out=indptr[1:], dtype=indptr.dtype)
    np.cumsum(indptr[1:], out=indptr[1:])
    return sparse.csr_matrix((np.ones(indptr[-1]), indices, indptr), shape=(n, feature_indices[-1]),
                             dtype=encoder.dtype)


def _fast_part(transformer: Any, frame: pd.DataFrame, columns: Any) -> Any:
    """The output of ``transformer.transform(frame[columns])`` for the fitted transformers this module builds,
    computed from their fitted attributes with the same NumPy operations (so the same floats), or None to go
    through scikit-learn. Per call, scikit-learn's input validation (``check_array``, feature-name checks,
    pandas column selection) costs ten times the arithmetic on a single row; single-item scoring paid it."""
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns) or not columns:
        return None
    if any(c not in frame.columns for c in columns):
        return None
    if type(transformer) is OneHotEncoder:
        return _one_hot(transformer, frame, columns)
    steps = ([s for _, s in transformer.steps] if type(transformer) is Pipeline
             else [transformer] if type(transformer) is SimpleImputer else None)
    if not steps or type(steps[0]) is not SimpleImputer or len(steps) > 2:
        return None
    X = _float_block(frame, columns)
    if X is None:
        return None
    X = _impute(steps[0], X)
    if X is not None and len(steps) == 2:
        X = _scale(steps[1], X)
    return X


def slim(preprocessor: ColumnTransformer) -> ColumnTransformer:
    """Make a fitted preprocessor cheap to store: a TF-IDF vocabulary maps terms to NumPy integers, which skops
    writes as one file per term (5,000 files and 5 MB for an SMS model, a second or two to save and to load);
    plain ints are one JSON object. Drops ``stop_words_`` (introspection only) where a version still keeps it.
    Transforms are unchanged."""
    for _, transformer, _ in getattr(preprocessor, "transformers_", []):
        if isinstance(transformer, TfidfVectorizer) and hasattr(transformer, "vocabulary_"):
            transformer.vocabulary_ = {str(term): int(j) for term, j in transformer.vocabulary_.items()}
            if hasattr(transformer, "stop_words_"):
                del transformer.stop_words_
    return preprocessor


def usable_text_fields(frame: pd.DataFrame, spec: dict[str, Any]) -> list[str]:
    """Text fields that contain at least one token (a TF-IDF vocabulary cannot be empty)."""
    usable = []
    for name in spec["text"]:
        if frame[name].str.contains(r"\w\w", regex=True).any():
            usable.append(name)
    return usable


def feature_group(output_name: str, spec: dict[str, Any]) -> tuple[str, str | None]:
    """Map a transformed column name (``num__amount``, ``cat__country_NG``, ``text_description__fee``) to
    (payload field, token or None)."""
    prefix, _, rest = output_name.partition("__")
    if prefix.startswith("text_"):
        return prefix[len("text_"):], rest
    if prefix == "num":
        for name in spec.get("datetime", []):
            if rest.startswith(f"{name}__"):
                return name, None
        return rest, None
    if prefix in ("cat", "freecat"):
        names = sorted((c["name"] for c in spec["categorical"]), key=len, reverse=True)
        for name in names:
            if rest == name or rest.startswith(f"{name}_"):
                return name, None
    return rest, None
