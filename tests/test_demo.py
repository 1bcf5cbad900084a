"""`manage.py demo` on the embedded default: SQLite file, filesystem broker, a real worker process."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_builds_a_scored_queue_without_any_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "PYTEST_VERSION",
                                                             "TEST_DATABASE_NAME"}}
    env.update(REVIEWAPP_ENV="demo", REVIEWAPP_VAR_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "manage.py", "demo", "--history", "1500", "--incoming", "200"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert "reviewapp is at http://127.0.0.1:8000/" in out
    for login in ("analyst", "admin", "mlengineer"):
        assert f"login: {login}" in out
    db = sqlite3.connect(tmp_path / "reviewapp.sqlite3")
    states = dict(db.execute("SELECT state, count(*) FROM ingest_item GROUP BY state").fetchall())
    assert states.get("decided") == 1500  # the labeled history
    assert states.get("queued", 0) + states.get("auto_decided", 0) == 200  # scored and routed by the worker
    assert states.get("queued", 0) > 0
    assert db.execute("SELECT count(*) FROM scoring_modelversion WHERE is_champion").fetchone()[0] == 1
    assert (tmp_path / "broker" / "queue").is_dir()  # the filesystem transport carried the work
