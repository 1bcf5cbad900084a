"""bench/load.py, short: the sustained mixed load (ingest at a steady rate, scoring by a live worker,
reviewers, exports) runs end to end against the test database and reports its figures with no errors and
every item at rest. The 10-minute run is `python bench/load.py --record` (figures in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT, database_url_for_worker


def test_the_load_bench_runs_clean_for_a_short_while(transactional_db: None) -> None:
    args = [
        "--no-migrate",
        "--duration",
        "10",
        "--rate",
        "4",
        "--reviewers",
        "4",
        "--export-every",
        "5",
        "--sample-every",
        "5",
        "--drain",
        "60",
        "--web-workers",
        "1",
        "--history",
        "800",
    ]
    result = subprocess.run(
        [sys.executable, "bench/load.py", "--database-url", database_url_for_worker(), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["errors"] == 0, figures["requests"]
    assert figures["not_at_rest"] == 0, figures["states"]
    requests = figures["requests"]
    assert requests["ingest"]["requests"] >= 20 and requests["claim"]["requests"] > 0
    assert requests["export"]["requests"] >= 1
    assert figures["lag_scored_items"] == requests["ingest"]["requests"]
    assert figures["lag_scored_p95_s"] is not None and figures["rss_web_mb"]["end"] > 0
