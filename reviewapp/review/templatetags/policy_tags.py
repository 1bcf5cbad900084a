"""Number formatting for the policy editor (shares, errors, thresholds)."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def pct(value: Any, digits: int = 1) -> str:
    """0.1234 -> "12.3%"; None -> an em dash."""
    if value is None or value == "":
        return "—"
    try:
        return f"{float(value) * 100:.{int(digits)}f}%"
    except (TypeError, ValueError):
        return "—"


@register.filter
def interval(value: Any, digits: int = 2) -> str:
    """[lo, hi] -> "1.20% to 3.40%" with an en dash between."""
    if not value:
        return "—"
    lo, hi = value
    return f"{pct(lo, digits)}–{pct(hi, digits)}"


@register.filter
def num(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    try:
        return f"{float(value):,.{int(digits)}f}"
    except (TypeError, ValueError):
        return "—"


@register.filter
def thr(value: Any) -> str:
    """A threshold as people read it: up to 4 decimals, no trailing zeros."""
    if value is None or value == "":
        return "never"
    return f"{float(value):.4f}".rstrip("0").rstrip(".")


@register.filter
def get_item(mapping: Any, key: Any) -> Any:
    if not mapping:
        return None
    return mapping.get(key)
