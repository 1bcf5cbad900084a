"""Session and CSRF settings, the login rate limit, and `manage.py check --deploy` on production settings."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from django.core.cache import cache

from reviewapp.core.ratelimit import BLOCKED_MESSAGE
from tests.conftest import ROOT
from tests.factories import PASSWORD, UserFactory


def _production_env(**extra: str) -> dict[str, str]:
    # The test session's own switches (pytest, Playwright's async allowance) are not a deployment's.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTEST_VERSION", "DJANGO_ALLOW_ASYNC_UNSAFE"}}
    env.update({"REVIEWAPP_ENV": "production", "SECRET_KEY": "x" * 20 + "-production-check-" + "y" * 30,
                "ALLOWED_HOSTS": "review.example.com", "DEBUG": "false", **extra})
    return env


def _settings_in(env: dict[str, str], *names: str) -> dict[str, Any]:
    code = ("import json, django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'reviewapp.settings');"
            "django.setup(); from django.conf import settings as s;"
            f"print(json.dumps({{n: getattr(s, n) for n in {list(names)!r}}}, default=str))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_check_deploy_is_clean_on_production_settings() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=_production_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_session_and_csrf_settings_are_hardened() -> None:
    values = _settings_in(
        _production_env(), "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SESSION_COOKIE_HTTPONLY",
        "CSRF_COOKIE_HTTPONLY", "SESSION_COOKIE_SAMESITE", "CSRF_COOKIE_SAMESITE", "SESSION_COOKIE_AGE",
        "SESSION_COOKIE_NAME", "CSRF_COOKIE_NAME", "SECURE_HSTS_SECONDS", "SECURE_SSL_REDIRECT", "X_FRAME_OPTIONS",
        "DEBUG", "LOGIN_RATE_LIMIT_FAILURES", "LOGIN_RATE_LIMIT_WINDOW",
    )
    assert values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["SESSION_COOKIE_HTTPONLY"] and values["CSRF_COOKIE_HTTPONLY"]
    assert values["SESSION_COOKIE_SAMESITE"] == values["CSRF_COOKIE_SAMESITE"] == "Lax"
    assert values["SESSION_COOKIE_AGE"] <= 12 * 3600
    # __Host- cookies: Secure, path /, no Domain: a sibling subdomain cannot plant or read them.
    assert values["SESSION_COOKIE_NAME"].startswith("__Host-") and values["CSRF_COOKIE_NAME"].startswith("__Host-")
    assert values["SECURE_HSTS_SECONDS"] >= 31536000 and values["SECURE_SSL_REDIRECT"]
    assert values["X_FRAME_OPTIONS"] == "DENY" and values["DEBUG"] is False
    assert values["LOGIN_RATE_LIMIT_FAILURES"] == 10 and values["LOGIN_RATE_LIMIT_WINDOW"] == 300


def test_login_is_rate_limited_per_username_and_address(client: Any, db: None, settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()
    UserFactory(username="victim", role="analyst")
    for _ in range(10):
        wrong = client.post("/login/", {"username": "victim", "password": "guess"})
        assert wrong.status_code == 200  # the form again, with Django's usual error
    blocked = client.post("/login/", {"username": "victim", "password": "guess"})
    assert blocked.status_code == 429
    assert BLOCKED_MESSAGE.format(minutes=5) in blocked.content.decode()
    # Even the right password is refused while blocked: a guesser cannot learn that it was right.
    right = client.post("/login/", {"username": "Victim", "password": PASSWORD})
    assert right.status_code == 429 and "_auth_user_id" not in client.session
    # Another address is not blocked (per username + address), and a success resets the count.
    other = client.post("/login/", {"username": "victim", "password": PASSWORD}, REMOTE_ADDR="10.9.8.7")
    assert other.status_code == 302
    cache.clear()
    fresh = client.post("/login/", {"username": "victim", "password": PASSWORD})
    assert fresh.status_code == 302
