"""Model families behind one interface. Importing this package never imports torch: families are registered by
name (with their title, so pages can list them) and their module is imported only when one is used; the torch
families import torch only inside their own module, on first use."""

from __future__ import annotations

import importlib
from typing import Any

# name -> ("module:attribute", title), so that heavy families load lazily.
_REGISTRY: dict[str, tuple[str, str]] = {
    "logreg": ("scoring.estimators.sklearn_families:LOGREG", "Logistic regression (scikit-learn)"),
    "hgb": ("scoring.estimators.sklearn_families:HGB", "Histogram gradient boosting (scikit-learn)"),
    "torch_mlp": ("scoring.estimators.torch_families:MLP", "Multilayer perceptron on tabular features (PyTorch)"),
    "torch_text": ("scoring.estimators.torch_families:TEXT",
                   "Text classifier: embedding bag over hashed tokens (PyTorch)"),
}
TORCH_FAMILIES = frozenset({"torch_mlp", "torch_text"})


def algorithm_names() -> list[str]:
    return list(_REGISTRY)


def algorithm_title(name: str) -> str:
    """A family's title without importing it (web pages list families; they must never import torch)."""
    entry = _REGISTRY.get(name)
    return entry[1] if entry else name


def get_family(name: str) -> Any:
    """The family object for ``name``; ValueError for an unknown name."""
    try:
        target = _REGISTRY[name][0]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(_REGISTRY)}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
