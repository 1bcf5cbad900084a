"""PostgreSQL stopped in immediate mode (a crash, as far as clients can tell) and started again while single
items are being sent to the API. Every answer must be a 2xx for an item that is really saved afterwards, or
a 503 with a JSON body and Retry-After: never a 2xx for unsaved work, never a 500.

Everything runs on infrastructure of the test's own: a PostgreSQL cluster initialised in a temp dir on a free
port, migrated; gunicorn serving the app against it; a throwaway Redis as its broker (the on-commit scoring
messages must not reach the shared queues, whose workers read another database)."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings as django_settings

from tests.conftest import ROOT
from tests.reliability.chaos import FULL
from tests.reliability.helpers import payment, record_figures
from tests.reliability.infra import ThrowawayPostgres, ThrowawayRedis, _wait_port, free_port

pytestmark = pytest.mark.skipif(not django_settings.IS_POSTGRES, reason="fault injection runs on PostgreSQL")
DOWN_SECONDS = 3.0
RESTARTS = 3 if FULL else 1
SENDERS = 3

SETUP = """
from rest_framework.authtoken.models import Token
from tests.factories import UserFactory, make_payments_source
make_payments_source(slug="pgchaos")
user = UserFactory(username="ingester", role="admin")
print(Token.objects.create(user=user).key)
"""


def _post(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        # No HTTP answer at all is not a 2xx either: the client knows nothing was promised.
        return 0, {}, repr(exc)


def _login_form(url: str) -> Callable[[], tuple[int, dict[str, str], str]]:
    """Fetch the login form (and its CSRF cookie) now; the returned call posts it later."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(url, timeout=30) as response:
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.read().decode())
    assert token, "no CSRF token in the login form"
    data = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": token.group(1), "username": "ingester", "password": "not-the-password"}
    ).encode()

    def post() -> tuple[int, dict[str, str], str]:
        try:
            with opener.open(urllib.request.Request(url, data=data, headers={"Referer": url}), timeout=30) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    return post


def test_postgres_restarted_in_immediate_mode_during_ingestion(tmp_path: Path) -> None:
    pg = ThrowawayPostgres()
    broker = ThrowawayRedis(tmp_path / "redis")
    server: subprocess.Popen | None = None
    started = time.monotonic()
    try:
        pg.init()
        pg.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE chaos")
        broker.start()
        env = {
            **os.environ,
            "DATABASE_URL": pg.url("chaos"),
            "REVIEWAPP_ENV": "test",
            "CELERY_BROKER_URL": broker.url,
            "DJANGO_SETTINGS_MODULE": "reviewapp.settings",
        }
        env.pop("PYTEST_VERSION", None)
        env.pop("TEST_DATABASE_NAME", None)
        manage = [sys.executable, "manage.py"]
        migrate = subprocess.run(
            [*manage, "migrate", "--noinput"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        setup = subprocess.run(
            [*manage, "shell", "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert setup.returncode == 0, setup.stderr[-3000:]
        token = setup.stdout.strip().splitlines()[-1]

        port = free_port()
        log = tmp_path / "gunicorn.log"
        with open(log, "ab") as out:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "reviewapp.wsgi",
                    "-b",
                    f"127.0.0.1:{port}",
                    "-w",
                    "1",
                    "--threads",
                    str(SENDERS + 1),
                    "--timeout",
                    "60",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(port, server, log, timeout=90)
        url = f"http://127.0.0.1:{port}/api/v1/sources/pgchaos/items/"

        answers: list[tuple[str, int, dict[str, str], str]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def sender(n: int) -> None:
            i = 0
            while not stop.is_set():
                external_id = f"pg-{n}-{i}-{uuid.uuid4().hex[:6]}"
                status, headers, body = _post(url, token, payment(external_id))
                with lock:
                    answers.append((external_id, status, headers, body))
                i += 1

        def ok_count() -> int:
            with lock:
                return sum(1 for a in answers if 200 <= a[1] < 300)

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(SENDERS)]
        for thread in threads:
            thread.start()
        recoveries = []
        page_answers: list[tuple[int, dict[str, str], str]] = []
        for _ in range(RESTARTS):
            floor = ok_count() + 10
            while ok_count() < floor:
                time.sleep(0.05)
            login = _login_form(f"http://127.0.0.1:{port}/login/")
            pg.stop("immediate")
            down_at = time.monotonic()
            # A plain Django view (the login form) meets the outage too: 503 from the middleware, not a 500.
            page_answers.append(login())
            time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_at)))
            pg.start()
            up_at = time.monotonic()
            floor = ok_count() + 1
            while ok_count() < floor and time.monotonic() - up_at < 60:
                time.sleep(0.05)
            recoveries.append(time.monotonic() - down_at)
            time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

        with psycopg.connect(pg.url("chaos")) as conn:
            rows = [
                row[0]
                for row in conn.execute(
                    "SELECT external_id FROM ingest_item i JOIN ingest_source s ON s.id = i.source_id "
                    "WHERE s.slug = 'pgchaos'"
                )
            ]
        saved = set(rows)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        broker.kill()
        pg.remove()

    statuses = [a[1] for a in answers]
    accepted = [a for a in answers if 200 <= a[1] < 300]
    unavailable = [a for a in answers if a[1] == 503]
    unsaved_2xx = [a[0] for a in accepted if a[0] not in saved]
    other = [(a[1], a[3][:300]) for a in answers if not (200 <= a[1] < 300 or a[1] == 503)]
    assert other == [], other  # no 500, no 4xx, no dropped connection
    assert unsaved_2xx == []
    assert unavailable, "no request met the database down; the scenario tested nothing"
    for _, _, headers, body in unavailable:
        assert json.loads(body)["detail"], body
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) > 0
    assert len(accepted) > 20
    for status, headers, body in page_answers:
        assert status == 503 and json.loads(body)["detail"], (status, body[:300])
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "5"
    record_figures(
        "postgres_immediate_restart_ingest",
        tried=len(answers),
        accepted=len(accepted),
        answered_503=len(unavailable),
        answered_5xx_other=sum(1 for s in statuses if s >= 500 and s != 503),
        lost=len(unsaved_2xx),
        duplicated=len(rows) - len(saved),
        restarts=RESTARTS,
        recovery_seconds=round(max(recoveries), 1),
        down_seconds=DOWN_SECONDS,
        seconds=round(time.monotonic() - started, 1),
    )
