"""The per-request capability cache (reviewapp/core/roles.py CapabilityBackend): one permission query per
signed-in request, and a role granted or revoked takes effect on the next request."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from reviewapp.core.roles import ROLE_CAPABILITIES, CapabilityBackend, Role, can, ensure_role_groups, user_roles
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
EVERY_CAPABILITY = sorted({c for caps in ROLE_CAPABILITIES.values() for c in caps})


def _permission_queries(ctx: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries if "auth_permission" in q["sql"]]


def _client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_backend_is_the_configured_one() -> None:
    assert django_settings.AUTHENTICATION_BACKENDS == ["reviewapp.core.roles.CapabilityBackend"]


def test_every_capability_check_in_a_request_costs_one_query(analyst: User) -> None:
    user = User.objects.get(pk=analyst.pk)  # a fresh object, as the auth middleware loads it per request
    with CaptureQueriesContext(connection) as ctx:
        answers = {cap: can(user, cap) for cap in EVERY_CAPABILITY * 3}
    assert len(ctx.captured_queries) == 1 and len(_permission_queries(ctx)) == 1
    assert {cap for cap, yes in answers.items() if yes} == set(ROLE_CAPABILITIES[Role.ANALYST])


def test_direct_and_group_permissions_both_count_once_each() -> None:
    ensure_role_groups()
    user = UserFactory(role="ml_engineer")
    # Held both directly and through the group: UNION keeps it once; held only directly: still granted.
    user.user_permissions.add(Permission.objects.get(codename="manage_models", content_type__app_label="core"))
    user.user_permissions.add(Permission.objects.get(codename="adjudicate", content_type__app_label="core"))
    fresh = User.objects.get(pk=user.pk)
    expected = {f"core.{c}" for c in (*ROLE_CAPABILITIES[Role.ML_ENGINEER], "adjudicate")}
    assert CapabilityBackend().get_all_permissions(fresh) == expected
    # The same answer as Django's own two-query computation.
    reference = User.objects.get(pk=user.pk)
    from django.contrib.auth.backends import ModelBackend

    assert ModelBackend().get_all_permissions(reference) == expected
    assert can(fresh, "adjudicate") and not can(fresh, "review_items")


def test_superuser_inactive_and_anonymous() -> None:
    from django.contrib.auth.models import AnonymousUser

    root = User.objects.create_superuser("root", "root@example.com", "x-very-long-password-1")
    assert all(can(User.objects.get(pk=root.pk), cap) for cap in EVERY_CAPABILITY)
    assert CapabilityBackend().get_all_permissions(User.objects.get(pk=root.pk)) >= {
        f"core.{c}" for c in EVERY_CAPABILITY
    }
    gone = UserFactory(role="admin")
    gone.is_active = False
    gone.save(update_fields=["is_active"])
    assert not any(can(User.objects.get(pk=gone.pk), cap) for cap in EVERY_CAPABILITY)
    assert not can(AnonymousUser(), "review_items")
    # An object-level question is not answered by role permissions.
    assert CapabilityBackend().get_all_permissions(User.objects.get(pk=gone.pk), obj=object()) == set()


def test_user_roles_is_memoised_per_user_object(analyst: User) -> None:
    user = User.objects.get(pk=analyst.pk)
    with CaptureQueriesContext(connection) as ctx:
        assert user_roles(user) == {"analyst"} and user_roles(user) == {"analyst"}
    assert len(ctx.captured_queries) == 1


def test_revoking_a_role_takes_effect_on_the_next_request(analyst: User) -> None:
    client = _client(analyst)
    assert client.get(reverse("review:work")).status_code == 200
    analyst.groups.remove(Group.objects.get(name=Role.ANALYST.value))
    assert client.get(reverse("review:work")).status_code == 403
    # And granting it back is seen just as soon.
    analyst.groups.add(Group.objects.get(name=Role.ANALYST.value))
    assert client.get(reverse("review:work")).status_code == 200


def test_revoking_a_role_takes_effect_on_the_next_api_request(analyst: User) -> None:
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_login(analyst)
    assert api.get("/api/v1/review/analysts/").status_code == 200
    analyst.groups.clear()
    assert api.get("/api/v1/review/analysts/").status_code == 403


def test_a_removed_capability_of_a_group_takes_effect_on_the_next_request(analyst: User) -> None:
    client = _client(analyst)
    assert client.get(reverse("review:work")).status_code == 200
    group = Group.objects.get(name=Role.ANALYST.value)
    group.permissions.remove(Permission.objects.get(codename="review_items", content_type__app_label="core"))
    assert client.get(reverse("review:work")).status_code == 403
