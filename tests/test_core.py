"""Configuration, roles, health endpoints, Celery baseline and the login pages."""

import os
import subprocess
import sys

import pytest
from django.contrib.auth.models import Group

from reviewapp.celery import app
from reviewapp.core.roles import Role, can
from reviewapp.queues import ALL_QUEUES
from tests.factories import PASSWORD, UserFactory


def _settings_in_subprocess(env: dict[str, str], expr: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"PYTEST_VERSION", "SECRET_KEY", "REVIEWAPP_ENV", "DEBUG"}}
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'reviewapp.settings'); django.setup(); "
        f"from django.conf import settings as s; print({expr})"
    )
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


def test_production_requires_secret_key():
    result = _settings_in_subprocess({}, "s.SECRET_KEY")
    assert result.returncode != 0
    assert "SECRET_KEY is required in production" in result.stderr


def test_production_defaults_are_strict():
    result = _settings_in_subprocess(
        {"SECRET_KEY": "x" * 50}, "s.DEBUG, s.ALLOWED_HOSTS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False [] True True"


def test_embedded_defaults_need_no_server():
    env = {"REVIEWAPP_ENV": "demo", "DATABASE_URL": "", "CELERY_BROKER_URL": ""}
    result = _settings_in_subprocess(env, "s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.db.backends.sqlite3 filesystem://"


def test_bad_boolean_is_a_clear_error():
    result = _settings_in_subprocess({"REVIEWAPP_ENV": "demo", "DEBUG": "maybe"}, "s.DEBUG")
    assert result.returncode != 0 and "DEBUG must be a boolean" in result.stderr


def test_celery_baseline():
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_ignore_result is True
    assert conf.task_time_limit < 3600  # below Redis' visibility timeout
    assert {q.name for q in conf.task_queues} == set(ALL_QUEUES)
    assert not conf.task_always_eager


@pytest.mark.django_db
def test_role_groups_and_capabilities():
    assert set(Group.objects.values_list("name", flat=True)) >= {r.value for r in Role}
    analyst = UserFactory(role="analyst")
    engineer = UserFactory(role="ml_engineer")
    admin = UserFactory(role="admin")
    assert can(analyst, "review_items") and not can(analyst, "export_labels")
    assert can(engineer, "export_labels") and not can(engineer, "review_items")
    assert all(can(admin, c) for c in ("manage_sources", "manage_policies", "export_labels", "review_items"))


@pytest.mark.django_db
def test_health_ready_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert ready.json()["checks"] == {"database": "ok", "migrations": "ok", "broker": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert b"reviewapp_items" in metrics.content


@pytest.mark.django_db
def test_readyz_reports_unreachable_broker(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("error")


@pytest.mark.django_db
def test_login_logout_and_role_home(client):
    user = UserFactory(username="ana2", role="analyst")
    page = client.get("/login/")
    assert page.status_code == 200 and b'name="username"' in page.content
    assert "Content-Security-Policy" in page.headers and "script-src 'self'" in page.headers["Content-Security-Policy"]
    response = client.post("/login/", {"username": user.username, "password": PASSWORD})
    assert response.status_code == 302
    assert client.get("/").url == "/queue/"
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302 and "/login/" in client.get("/").url


@pytest.mark.django_db
def test_wrong_password_is_refused(client):
    UserFactory(username="ana3", role="analyst")
    response = client.post("/login/", {"username": "ana3", "password": "nope"})
    assert response.status_code == 200 and b"didn't match" in response.content


@pytest.mark.django_db
def test_api_requires_authentication_with_json_error(client):
    response = client.get("/api/v1/sources/")
    assert response.status_code in (401, 403)
    assert "detail" in response.json() and "errors" in response.json()


@pytest.mark.django_db
def test_openapi_schema_lists_the_contract(client, admin_user):
    client.force_login(admin_user)
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"] if response.headers["Content-Type"].startswith("application/json") else None
    text = response.content.decode()
    for path in ("/api/v1/sources/", "/api/v1/queue/claim/", "/api/v1/sources/{slug}/labels/export/"):
        assert path in (paths or text)
