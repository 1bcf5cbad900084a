"""Login rate limiting: after LOGIN_RATE_LIMIT_FAILURES failed sign-ins for one username from one address
within LOGIN_RATE_LIMIT_WINDOW seconds, further attempts are refused with 429 until the window passes.

Counts live in Django's cache ("default"). The default cache is per process (locmem); set CACHE_REDIS_URL
so that every web process shares the counts (see settings.CACHES and docs/reliability.md)."""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse

BLOCKED_MESSAGE = "Too many failed sign-ins for this account from your address. Try again in {minutes} minutes."


def _key(request: HttpRequest, username: str) -> str:
    address = request.META.get("REMOTE_ADDR", "")
    digest = hashlib.sha256(f"{username.strip().lower()}|{address}".encode()).hexdigest()
    return f"login-failures:{digest}"


def login_failures(request: HttpRequest, username: str) -> int:
    return int(cache.get(_key(request, username), 0))


def login_failure_record(request: HttpRequest, username: str) -> int:
    """One more failure; the window starts at the first failure and is not extended by later ones."""
    key = _key(request, username)
    window = int(settings.LOGIN_RATE_LIMIT_WINDOW)
    if cache.add(key, 1, timeout=window):
        return 1
    try:
        return int(cache.incr(key))
    except ValueError:  # expired between add and incr
        cache.add(key, 1, timeout=window)
        return 1


def login_failures_reset(request: HttpRequest, username: str) -> None:
    cache.delete(_key(request, username))


class RateLimitedLoginView(LoginView):
    """Django's LoginView, refusing (429) an account+address pair past its failure budget."""

    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = str(request.POST.get("username", ""))[:150]
        if username and login_failures(request, username) >= int(settings.LOGIN_RATE_LIMIT_FAILURES):
            minutes = max(1, int(settings.LOGIN_RATE_LIMIT_WINDOW) // 60)
            blocked = BLOCKED_MESSAGE.format(minutes=minutes)
            context = self.get_context_data(form=self.form_class(request), blocked=blocked)
            return self.render_to_response(context, status=429)
        response = super().post(request, *args, **kwargs)
        if username:
            if request.user.is_authenticated:
                login_failures_reset(request, username)
            else:
                login_failure_record(request, username)
        return response
