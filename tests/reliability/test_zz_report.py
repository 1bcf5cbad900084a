"""Runs last in this folder (file order): renders the figures the scenarios above recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.reliability.helpers import FIGURES_PATH
from tests.reliability.render import BEGIN, END, render_table, update_doc


def test_figures_render_into_the_doc(tmp_path: Path) -> None:
    figures = tmp_path / "f.json"
    figures.write_text(json.dumps({"s": {"tried": 3, "lost": 0, "duplicated": 0, "recorded_at": "t"}}))
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    update_doc(figures, doc)
    text = doc.read_text()
    assert "| s | 3 | 0 | 0 |" in text and "old" not in text and text.endswith("outro\n")
    assert render_table({}).count("\n") == 1


def test_recorded_figures_meet_their_bars() -> None:
    if not FIGURES_PATH.exists():
        return
    data = json.loads(FIGURES_PATH.read_text())
    bad = {k: v for k, v in data.items()
           if v.get("lost", 0) or v.get("duplicated", 0) or v.get("double_claims", 0) or v.get("mismatches", 0)}
    assert bad == {}
    if os.environ.get("UPDATE_RELIABILITY_DOC") == "1":
        update_doc()
