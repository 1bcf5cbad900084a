"""Scoring knobs, read from Django settings with defaults here, so a deployment may override any of them in
settings.py (from the environment) without scoring code caring where they came from."""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Split-conformal prediction sets: miscoverage level and score ("lac" or "aps").
    "CONFORMAL_ALPHA": 0.1,
    "CONFORMAL_METHOD": "lac",
    # Selective risk control stored with every model version (a target-error policy reads it).
    "RISK_CONTROL_DEFAULT_TARGET_ERROR": 0.02,
    "RISK_CONTROL_DEFAULT_CONFIDENCE": 0.95,
    # Cross-fitting where labels are few: up to this many labels, every label is scored out of fold by K models
    # (each trained without its block) and all of them back the thresholds; above it, the newest 20% does.
    "RISK_CONTROL_CROSSFIT_FOLDS": 5,
    "RISK_CONTROL_CROSSFIT_MAX_LABELS": 20_000,
    # Automatic promotion: the candidate's macro-F1 must reach the champion's plus this margin, on the same
    # held-out labels, and its ECE may exceed the champion's by at most this much (0: no worse).
    "PROMOTION_MIN_MACRO_F1_GAIN": 0.0,
    "PROMOTION_MAX_ECE_INCREASE": 0.0,
    # A candidate that is not promoted automatically scores live items beside the champion (not routing them).
    "SHADOW_CANDIDATES": True,
    "SHADOW_MAX_PER_SOURCE": 1,
    # Explanations for "review" (items a person will look at: queued or QA-sampled) or "all" items.
    "SCORING_EXPLAIN": "review",
    # Nearest-neighbour index of decided items built with each version (the newest N labeled items).
    "SIMILARITY_INDEX_MAX_ITEMS": 50_000,
    # The algorithm the retraining check uses for a source's first model.
    "RETRAIN_DEFAULT_ALGORITHM": "logreg",
}


def get(name: str) -> Any:
    return getattr(settings, name, DEFAULTS[name])
