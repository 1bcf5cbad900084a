"""A URL configuration for the actions tests: the actions pages and API, plus stand-ins for every other
link of base.html (read from the template, so the nav can grow without breaking these tests)."""

import re
from collections import defaultdict

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.urls import include, path

from reviewapp.core import views as core_views

OWN = {"home", "login", "logout", "admin", "actions"}


def _stub(request):  # type: ignore[no-untyped-def]
    return HttpResponse("stub")


def _nav_names() -> dict[str, set[str]]:
    base = (settings.BASE_DIR / "templates" / "base.html").read_text()
    names: dict[str, set[str]] = defaultdict(set)
    for ref in re.findall(r"{%\s*url\s+'([^']+)'", base):
        namespace, _, name = ref.rpartition(":")
        if (namespace or name) not in OWN:
            names[namespace].add(name)
    return names


def _stubs() -> list:
    patterns = []
    for namespace, names in _nav_names().items():
        urls = [path(f"{n}/", _stub, name=n) for n in sorted(names)]
        if namespace:
            patterns.append(path(f"stub/{namespace}/", include((urls, namespace))))
        else:
            patterns.extend(path(f"stub/{u.pattern}", _stub, name=u.name) for u in urls)
    return patterns


urlpatterns = [
    path("", core_views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("actions.api_urls")),
    path("", include("actions.urls")),
    *_stubs(),
]
