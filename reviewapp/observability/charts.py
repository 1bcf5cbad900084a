"""Server-side charts as inline SVG: no JavaScript, no chart library, nothing from a CDN.

Every piece of text that reaches the markup (titles, series and category names, which may come from
source slugs or schema field names) goes through ``escape``; numbers are formatted here. Each chart is an
``<svg role="img">`` with a ``<title>``, and each point or bar carries a ``<title>`` that browsers show on
hover, so values can be read without a script.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = ("#2f5bd3", "#1e7f4f", "#a86400", "#b3261e", "#6b4fbb", "#0f7c8c", "#5b6475")
WIDTH, HEIGHT = 560, 210
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 12, 40, 30


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]
    color: str | None = None
    dashed: bool = False


def fmt_int(v: float) -> str:
    return f"{v:,.0f}"


def fmt_pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def fmt_float(v: float) -> str:
    return f"{v:.2f}"


def fmt_duration(v: float) -> str:
    if v < 1:
        return f"{v * 1000:.0f}ms"
    if v < 120:
        return f"{v:.0f}s"
    if v < 7200:
        return f"{v / 60:.0f}m"
    if v < 172800:
        return f"{v / 3600:.1f}h"
    return f"{v / 86400:.1f}d"


FORMATS: dict[str, Callable[[float], str]] = {
    "int": fmt_int, "pct": fmt_pct, "float": fmt_float, "duration": fmt_duration,
}


def nice_max(value: float) -> float:
    """The smallest 1/2/2.5/5 x 10^k at or above ``value`` (1 for nothing), so ticks read well."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _open(title: str, css: str, width: int = WIDTH, height: int = HEIGHT) -> list[str]:
    t = escape(title)
    return [
        f'<svg class="chart {css}" viewBox="0 0 {width} {height}" role="img" aria-label="{t}" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
        f"<title>{t}</title>",
        f'<text class="chart-title" x="{PAD_LEFT}" y="16">{t}</text>',
    ]


def _empty(parts: list[str], width: int = WIDTH, height: int = HEIGHT) -> SafeString:
    parts.append(f'<text class="chart-empty" x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
                 "No data in this range</text></svg>")
    return _safe(parts)


def _safe(parts: list[str]) -> SafeString:
    # Every interpolated string above was escaped; numbers were formatted by this module.
    return mark_safe("".join(parts))  # noqa: S308


def _y_axis(parts: list[str], y_max: float, fmt: Callable[[float], str], plot_h: float, width: int) -> None:
    for i in range(3):
        v = y_max * i / 2
        y = PAD_TOP + plot_h - plot_h * i / 2
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{width - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{PAD_LEFT - 6}" y="{y + 3:.1f}" text-anchor="end">{escape(fmt(v))}</text>')


def _x_labels(parts: list[str], labels: Sequence[str], xs: Sequence[float], height: int) -> None:
    if not labels:
        return
    picks = sorted({0, len(labels) // 2, len(labels) - 1})
    for i in picks:
        anchor = "start" if i == 0 else ("end" if i == len(labels) - 1 else "middle")
        parts.append(f'<text class="tick" x="{xs[i]:.1f}" y="{height - 10}" text-anchor="{anchor}">'
                     f"{escape(labels[i])}</text>")


def _legend(parts: list[str], series: Sequence[Series], width: int) -> None:
    """One row under the title, left to right (never over the title, whatever its length)."""
    x = float(PAD_LEFT)
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        parts.append(f'<rect class="key" x="{x:.0f}" y="22" width="9" height="9" fill="{color}"/>'
                     f'<text class="legend" x="{x + 13:.0f}" y="30">{escape(s.name)}</text>')
        x += 6 * len(s.name) + 28


def line_chart(
    *,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    fmt: str = "int",
    band: tuple[float, float] | None = None,
    band_label: str = "",
    y_max: float | None = None,
    css: str = "",
    width: int = WIDTH,
    height: int = HEIGHT,
) -> SafeString:
    """One line per series over the labelled buckets; ``None`` values leave a gap. ``band`` shades a
    target range (e.g. the 5-20% human review band)."""
    formatter = FORMATS[fmt]
    parts = _open(title, f"chart-line {css}".strip(), width, height)
    values = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    if not values or not labels:
        return _empty(parts, width, height)
    top = y_max if y_max is not None else nice_max(max([*values, band[1] if band else 0.0]))
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_TOP - PAD_BOTTOM
    n = len(labels)
    xs = [PAD_LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2) for i in range(n)]

    def y_of(v: float) -> float:
        return PAD_TOP + plot_h - plot_h * min(max(v / top, 0.0), 1.0)

    _y_axis(parts, top, formatter, plot_h, width)
    if band:
        y_hi, y_lo = y_of(band[1]), y_of(band[0])
        parts.append(f'<rect class="band" x="{PAD_LEFT}" y="{y_hi:.1f}" width="{plot_w}" height="{y_lo - y_hi:.1f}">'
                     f"<title>{escape(band_label or 'target band')}</title></rect>")
    for si, s in enumerate(series):
        color = s.color or PALETTE[si % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        segment: list[str] = []
        segments: list[list[str]] = []
        for i, v in enumerate(s.values[:n]):
            if v is None or not math.isfinite(v):
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{xs[i]:.1f},{y_of(v):.1f}")
        if segment:
            segments.append(segment)
        for seg in segments:
            if len(seg) > 1:
                parts.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2"{dash} '
                             f'points="{" ".join(seg)}"/>')
        name = escape(s.name)
        for i, v in enumerate(s.values[:n]):
            if v is not None and math.isfinite(v):
                parts.append(f'<circle class="point" cx="{xs[i]:.1f}" cy="{y_of(v):.1f}" r="2.5" fill="{color}">'
                             f"<title>{name} · {escape(labels[i])}: {escape(formatter(v))}</title></circle>")
    _x_labels(parts, labels, xs, height)
    _legend(parts, series, width)
    parts.append("</svg>")
    return _safe(parts)


def bar_chart(
    *,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    fmt: str = "int",
    threshold: float | None = None,
    threshold_label: str = "",
    band: tuple[float, float] | None = None,
    y_max: float | None = None,
    css: str = "",
    width: int = WIDTH,
    height: int = HEIGHT,
    all_labels: bool = True,
) -> SafeString:
    """Vertical bars per category, one bar per series side by side (a histogram when the categories are
    bins). ``threshold`` draws a dashed line (e.g. the PSI alert level)."""
    formatter = FORMATS[fmt]
    parts = _open(title, f"chart-bars {css}".strip(), width, height)
    values = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    if not values or not categories:
        return _empty(parts, width, height)
    top = y_max if y_max is not None else nice_max(max([*values, threshold or 0.0, band[1] if band else 0.0]))
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_TOP - PAD_BOTTOM
    n, k = len(categories), max(len(series), 1)
    slot = plot_w / n
    bar_w = max(slot * 0.8 / k, 1.0)

    def y_of(v: float) -> float:
        return PAD_TOP + plot_h - plot_h * min(max(v / top, 0.0), 1.0)

    _y_axis(parts, top, formatter, plot_h, width)
    if band:
        y_hi, y_lo = y_of(band[1]), y_of(band[0])
        parts.append(f'<rect class="band" x="{PAD_LEFT}" y="{y_hi:.1f}" width="{plot_w}" height="{y_lo - y_hi:.1f}"/>')
    for si, s in enumerate(series):
        color = s.color or PALETTE[si % len(PALETTE)]
        for i, v in enumerate(s.values[:n]):
            # Nothing to draw for an empty bucket (its tooltip would say 0 over a bar of no height).
            if v is None or not math.isfinite(v) or v == 0:
                continue
            x = PAD_LEFT + slot * i + slot * 0.1 + bar_w * si
            y = y_of(v)
            parts.append(f'<rect class="b" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                         f'height="{PAD_TOP + plot_h - y:.1f}" fill="{color}">'
                         f"<title>{escape(s.name)} · {escape(categories[i])}: {escape(formatter(v))}</title></rect>")
    if threshold is not None:
        y = y_of(threshold)
        parts.append(f'<line class="threshold" x1="{PAD_LEFT}" x2="{width - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}">'
                     f"<title>{escape(threshold_label or formatter(threshold))}</title></line>")
    centers = [PAD_LEFT + slot * (i + 0.5) for i in range(n)]
    if all_labels and n <= 12:
        for i, c in enumerate(categories):
            short = c if len(c) <= 14 else c[:13] + "…"
            parts.append(f'<text class="tick" x="{centers[i]:.1f}" y="{height - 10}" text-anchor="middle">'
                         f"{escape(short)}</text>")
    else:
        _x_labels(parts, categories, centers, height)
    if len(series) > 1:
        _legend(parts, series, width)
    parts.append("</svg>")
    return _safe(parts)


def hbar_chart(
    *,
    title: str,
    categories: Sequence[str],
    values: Sequence[float | None],
    fmt: str = "float",
    threshold: float | None = None,
    css: str = "",
    width: int = WIDTH,
    row_height: int = 22,
    label_width: int = 170,
) -> SafeString:
    """Horizontal bars, one row per category (long names such as feature names stay readable)."""
    formatter = FORMATS[fmt]
    height = PAD_TOP + row_height * max(len(categories), 1) + 8
    parts = _open(title, f"chart-hbar {css}".strip(), width, height)
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return _empty(parts, width, height)
    top = nice_max(max([*finite, threshold or 0.0]))
    plot_w = width - label_width - PAD_RIGHT - 50
    for i, (name, v) in enumerate(zip(categories, values, strict=True)):
        y = PAD_TOP + row_height * i
        short = name if len(name) <= 26 else name[:25] + "…"
        parts.append(f'<text class="tick" x="{label_width - 6}" y="{y + row_height * 0.65:.1f}" text-anchor="end">'
                     f"{escape(short)}</text>")
        if v is None or not math.isfinite(v):
            continue
        w = plot_w * min(max(v / top, 0.0), 1.0)
        over = threshold is not None and v > threshold
        color = PALETTE[3] if over else PALETTE[0]
        parts.append(f'<rect class="b{" over" if over else ""}" x="{label_width}" y="{y + 3:.1f}" width="{w:.1f}" '
                     f'height="{row_height - 6}" fill="{color}"><title>{escape(name)}: {escape(formatter(v))}</title>'
                     f'</rect><text class="value" x="{label_width + w + 4:.1f}" y="{y + row_height * 0.65:.1f}">'
                     f"{escape(formatter(v))}</text>")
    if threshold is not None:
        x = label_width + plot_w * min(threshold / top, 1.0)
        parts.append(f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_TOP - 4}" '
                     f'y2="{height - 12}"><title>alert threshold {escape(formatter(threshold))}</title></line>')
    parts.append("</svg>")
    return _safe(parts)


def reliability_chart(*, title: str, bins: Sequence[dict], n_bins: int = 10, width: int = WIDTH,
                      height: int = HEIGHT) -> SafeString:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    parts = _open(title, "reliability", width, height)
    if not bins:
        return _empty(parts, width, height)
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_TOP - PAD_BOTTOM
    x0, y0 = PAD_LEFT, PAD_TOP + plot_h
    parts.append(f'<line class="diag" x1="{x0}" y1="{y0}" x2="{x0 + plot_w}" y2="{PAD_TOP}"/>')
    _y_axis(parts, 1.0, fmt_pct, plot_h, width)
    slot = plot_w / n_bins
    for b in bins:
        i = int(b["bin"])
        h = plot_h * min(max(float(b["accuracy"]), 0.0), 1.0)
        parts.append(f'<rect class="b" x="{x0 + slot * i + 1:.1f}" y="{y0 - h:.1f}" width="{slot - 2:.1f}" '
                     f'height="{h:.1f}" fill="{PALETTE[0]}" fill-opacity="0.7"><title>confidence '
                     f'{fmt_pct(i / n_bins)}–{fmt_pct((i + 1) / n_bins)}: accuracy {fmt_pct(float(b["accuracy"]))}, '
                     f'mean confidence {fmt_pct(float(b["confidence"]))}, n={int(b["n"])}</title></rect>')
    parts.append(f'<text class="tick" x="{x0}" y="{height - 10}">0%</text>'
                 f'<text class="tick" x="{x0 + plot_w}" y="{height - 10}" text-anchor="end">confidence 100%</text>')
    parts.append("</svg>")
    return _safe(parts)
