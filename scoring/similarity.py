"""Similar past decisions: a nearest-neighbour index over already-decided items of a source, built at training
time (no Django imports).

The space is the source's own sparse features (standardised numbers, one-hot categories, TF-IDF text), each row
scaled to unit length, searched by cosine distance with scikit-learn's brute-force NearestNeighbors (exact; a
sparse matrix product per query, a few milliseconds for tens of thousands of items). The index is a plain dict of
scikit-learn objects and NumPy arrays, so it is stored and loaded like a model bundle (skops, by hash).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from scoring.features import build_preprocessor, slim, usable_text_fields

INDEX_FORMAT = 1


def build_index(
    frame: pd.DataFrame, labels: list[str], item_ids: list[int], spec: dict[str, Any], label_set: list[str]
) -> dict[str, Any]:
    """An index over ``frame`` (decided items, any order) with their labels and item ids."""
    if not len(frame):
        raise ValueError("no decided items to index")
    spec = {**spec, "text": usable_text_fields(frame, spec)}
    preprocessor = build_preprocessor(spec)
    X = normalize(preprocessor.fit_transform(frame).astype(np.float32))
    slim(preprocessor)
    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(X)
    index = {label: k for k, label in enumerate(label_set)}
    return {
        "format": INDEX_FORMAT,
        "spec": spec,
        "preprocessor": preprocessor,
        "nn": nn,
        "item_ids": np.asarray(item_ids, dtype=np.int64),
        "labels": np.asarray([index.get(str(lab), -1) for lab in labels], dtype=np.int16),
        "label_set": list(label_set),
    }


def query(index: dict[str, Any], frame: pd.DataFrame, *, k: int = 5,
          exclude: list[int] | None = None) -> list[list[dict[str, Any]]]:
    """Per row of ``frame``: up to ``k`` nearest indexed items, nearest first, as ``{"item_id", "label",
    "distance"}``; an item id in ``exclude[i]`` (the row's own item) is skipped."""
    if index.get("format") != INDEX_FORMAT:
        raise ValueError("not a similarity index this version can read")
    n_indexed = len(index["item_ids"])
    if not len(frame) or not n_indexed or k <= 0:
        return [[] for _ in range(len(frame))]
    X = normalize(index["preprocessor"].transform(frame).astype(np.float32))
    want = min(k + 1, n_indexed)
    distances, positions = index["nn"].kneighbors(X, n_neighbors=want)
    label_set = index["label_set"]
    out = []
    for i in range(len(frame)):
        own = exclude[i] if exclude is not None else None
        found = []
        for d, j in zip(distances[i], positions[i], strict=True):
            item_id = int(index["item_ids"][j])
            if item_id == own:
                continue
            code = int(index["labels"][j])
            found.append({"item_id": item_id, "label": label_set[code] if code >= 0 else None,
                          # Cosine distance of unit vectors: 0 identical, 1 unrelated (float rounding clipped).
                          "distance": round(float(max(d, 0.0)), 4)})
            if len(found) == k:
                break
        out.append(found)
    return out
