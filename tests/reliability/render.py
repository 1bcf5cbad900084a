"""Render the figures of the last reliability run (var/reliability-figures.json) into docs/reliability.md,
between the FIGURES markers. `make chaos` runs it; so does the suite when UPDATE_RELIABILITY_DOC=1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# No Django here (the script runs on its own); these two match tests/reliability/helpers.py.
ROOT = Path(__file__).resolve().parents[2]
FIGURES_PATH = Path(os.environ.get("RELIABILITY_FIGURES", ROOT / "var" / "reliability-figures.json"))

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- FIGURES:BEGIN -->", "<!-- FIGURES:END -->"
COLUMNS = ("tried", "lost", "duplicated", "recovery_seconds", "seconds")


def render_table(data: dict[str, dict]) -> str:
    lines = ["| scenario | tried | lost | duplicated | recovery (s) | run time (s) | other figures | recorded |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for name in sorted(data):
        row = data[name]
        cells = [str(row.get(c, "–")) for c in COLUMNS]
        other = ", ".join(f"{k}={v}" for k, v in sorted(row.items()) if k not in {*COLUMNS, "recorded_at"})
        lines.append(f"| {name} | {' | '.join(cells)} | {other} | {row.get('recorded_at', '')} |")
    return "\n".join(lines)


def update_doc(figures: Path = FIGURES_PATH, doc: Path = DOC) -> str:
    table = render_table(json.loads(figures.read_text()))
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    return table


if __name__ == "__main__":
    sys.stdout.write(update_doc() + "\n")
