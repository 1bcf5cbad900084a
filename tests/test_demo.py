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

    # The analyst's pages work on SQLite too (a PostgreSQL-only query would fail here, not in the rest of
    # the suite): queue, claim the next item, and decide it.
    script = """
from django.test import Client
from django.contrib.auth.models import User
from reviewapp.ingest.models import Item
client = Client(SERVER_NAME="127.0.0.1")
client.force_login(User.objects.get(username="analyst"))
queue = client.get("/queue/")
assert queue.status_code == 200, queue.status_code
assert client.post("/review/claim/").status_code in (200, 302)
page = client.get("/review/")
assert page.status_code == 200, page.status_code
held = Item.objects.filter(state="in_review").first()
assert held is not None, "nothing claimed"
label = held.prediction.top_label if held.prediction_id else "legit"
answer = client.post(f"/review/items/{held.pk}/verdict/", {"label": label, "idempotency_key": "demo-sqlite-1"})
assert answer.status_code in (200, 302), answer.status_code
held.refresh_from_db()
assert held.state == "decided", held.state
print("SQLITE-REVIEW-OK")
"""
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "SQLITE-REVIEW-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
