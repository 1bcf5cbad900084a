"""Formatting filters for the observability pages: {% load observability %}."""

from __future__ import annotations

from django import template

from reviewapp.observability.services import format_duration

register = template.Library()


@register.filter
def pct(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{float(value) * 100:.{int(digits)}f}%"


@register.filter
def duration(value: float | None) -> str:
    return format_duration(value)


@register.filter
def psi(value: float | None) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


@register.filter
def get(mapping: dict, key: object) -> object:
    return mapping.get(key) if isinstance(mapping, dict) else None
