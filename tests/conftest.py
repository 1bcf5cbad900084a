"""Shared fixtures. Integration tests run a real Celery worker process against the test database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import UserFactory

ROOT = Path(__file__).resolve().parent.parent
# Playwright's sync API runs an event loop in the test thread; the ORM calls in our tests are still
# synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.2, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def database_url_for_worker() -> str:
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


@pytest.fixture(scope="session")
def celery_worker_process(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: Any
) -> Iterator[subprocess.Popen]:
    """A real `celery worker` process (prefork, every queue) pointed at the test database."""
    from reviewapp.celery import app
    from reviewapp.queues import ALL_QUEUES

    with django_db_blocker.unblock():
        db_url = database_url_for_worker()
    # Messages left by an earlier, interrupted run must not leak into this one.
    app.control.purge()
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**os.environ, "DATABASE_URL": db_url, "REVIEWAPP_ENV": "test"}
    env.pop("PYTEST_VERSION", None)
    name = f"test-{uuid.uuid4().hex[:8]}@%h"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "reviewapp", "worker", "-Q", ",".join(ALL_QUEUES),
             "-c", "2", "-n", name, "--loglevel=INFO", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 90
    hostname = name.replace("%h", os.uname().nodename)
    while not app.control.ping(destination=[hostname], timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"celery worker did not start:\n{log_path.read_text()[-4000:]}")
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.hostname = hostname  # type: ignore[attr-defined]
    _worker_started.append(proc)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


_worker_started: list[subprocess.Popen] = []


def worker_is_idle(proc: subprocess.Popen) -> bool:
    """No message waiting in any of our queues and none reserved or running in the session worker."""
    from reviewapp.celery import app
    from reviewapp.queues import ALL_QUEUES

    broker_url = settings.CELERY_BROKER_URL
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker_url)
        for queue in ALL_QUEUES:
            # kombu's priority sub-queues are named "<queue>\x06\x16<n>".
            if client.llen(queue) or any(client.llen(k) for k in client.scan_iter(f"{queue}\x06\x16*")):
                return False
    inspect = app.control.inspect(destination=[proc.hostname], timeout=2.0)  # type: ignore[attr-defined]
    # Asked one after the other so a busy answer skips the second round trip; no answer counts as busy.
    return all((busy := ask()) is not None and not any(busy.values()) for ask in (inspect.active, inspect.reserved))


@pytest.fixture(autouse=True)
def _quiet_worker_before_flush(request: pytest.FixtureRequest) -> Iterator[None]:
    """A transactional test ends by truncating every table; a task still running from it (an upload's
    ingest, a scoring chain) would deadlock with the TRUNCATE. Wait until the worker is idle first.
    Requesting transactional_db from here makes this teardown run before the flush."""
    transactional = "transactional_db" in request.fixturenames or "live_worker" in request.fixturenames
    if transactional:
        request.getfixturevalue("transactional_db")
    yield
    if not transactional or not _worker_started or _worker_started[0].poll() is not None:
        return
    deadline = time.monotonic() + 120
    idle_twice = 0
    while idle_twice < 2 and time.monotonic() < deadline:
        idle_twice = idle_twice + 1 if worker_is_idle(_worker_started[0]) else 0
        time.sleep(0.05)


@pytest.fixture
def live_worker(celery_worker_process: subprocess.Popen, transactional_db: None) -> subprocess.Popen:
    """Use in tests that need tasks to run: rows are committed so the worker can see them."""
    if celery_worker_process.poll() is not None:
        pytest.fail("the celery worker process has died; see its log: "
                    f"{celery_worker_process.log_path.read_text()[-4000:]}")  # type: ignore[attr-defined]
    return celery_worker_process


@pytest.fixture
def analyst(db: None) -> Any:
    return UserFactory(username="ana", role="analyst")


@pytest.fixture
def admin_user(db: None) -> Any:
    return UserFactory(username="adam", role="admin")


@pytest.fixture
def ml_engineer(db: None) -> Any:
    return UserFactory(username="emma", role="ml_engineer")


def api_client_for(user: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def admin_api(admin_user: Any) -> APIClient:
    return api_client_for(admin_user)


@pytest.fixture
def analyst_api(analyst: Any) -> APIClient:
    return api_client_for(analyst)


@pytest.fixture
def ml_api(ml_engineer: Any) -> APIClient:
    return api_client_for(ml_engineer)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session (Debian's, never a downloaded build)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh context per test at 1280x800; `page.dialogs` records any alert/confirm that fires."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    new_page = context.new_page()
    dialogs: list[str] = []
    new_page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    new_page.dialogs = dialogs
    yield new_page
    context.close()


@pytest.fixture
def shared_data_dir() -> Path:
    path = Path(settings.SHARED_DATA_DIR)
    if not (path / "sms_spam.tsv").exists():
        pytest.fail(f"shared data not found at {path}; set REVIEWAPP_SHARED_DATA")
    return path


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a failed run: every test must run here (PostgreSQL, Redis, worker, browser)."""
    if _skipped and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nFAILED: {len(_skipped)} test(s) were skipped; the suite allows none: {_skipped[:10]}")
