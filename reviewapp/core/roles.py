"""The three roles, as Django groups built from the Capability permissions."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group, Permission


class Role(StrEnum):
    ANALYST = "analyst"
    ADMIN = "admin"
    ML_ENGINEER = "ml_engineer"


ROLE_CAPABILITIES: dict[Role, tuple[str, ...]] = {
    Role.ANALYST: ("review_items",),
    Role.ADMIN: (
        "review_items",
        "adjudicate",
        "manage_sources",
        "ingest_data",
        "manage_policies",
        "manage_models",
        "export_labels",
    ),
    Role.ML_ENGINEER: ("manage_models", "export_labels", "ingest_data"),
}


def ensure_role_groups(sender: Any = None, **kwargs: Any) -> None:
    """Create or update the role groups (idempotent; runs after every migrate)."""
    if getattr(sender, "label", "core") != "core":
        return
    perms = {p.codename: p for p in Permission.objects.filter(content_type__app_label="core")}
    if not perms:
        return
    for role, codenames in ROLE_CAPABILITIES.items():
        group, _ = Group.objects.get_or_create(name=role.value)
        group.permissions.set([perms[c] for c in codenames if c in perms])


class CapabilityBackend(ModelBackend):
    """ModelBackend whose permission set costs one query instead of two (direct and group permissions).

    Every signed-in page asks for capabilities (the nav, the view's own check), so this runs on every
    request. The set is memoised in ``_perm_cache`` on the user object, which the auth middleware loads
    afresh for each request: a role revoked now takes effect on the user's next request, never later.
    """

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if not user_obj.is_active or user_obj.is_anonymous or obj is not None:
            return set()
        if not hasattr(user_obj, "_perm_cache"):
            if user_obj.is_superuser:
                rows = Permission.objects.values_list("content_type__app_label", "codename")
            else:
                # UNION (not an OR across two many-to-many joins): each side uses its own index, and
                # UNION removes the duplicates a permission held both directly and by a group gives.
                # No ORDER BY on either side (Permission's default ordering): SQLite refuses it inside UNION.
                direct = (
                    Permission.objects.filter(user=user_obj)
                    .order_by()
                    .values_list("content_type__app_label", "codename")
                )
                by_group = (
                    Permission.objects.filter(group__user=user_obj)
                    .order_by()
                    .values_list("content_type__app_label", "codename")
                )
                rows = direct.union(by_group)
            user_obj._perm_cache = {f"{app}.{codename}" for app, codename in rows}
        return user_obj._perm_cache


def can(user: AbstractBaseUser | AnonymousUser, capability: str) -> bool:
    """The one capability check for views, APIs, services and templates (through the auth backends'
    per-request permission cache, so repeated checks in one request cost no further queries)."""
    return bool(user.is_authenticated and user.has_perm(f"core.{capability}"))


def user_roles(user: AbstractBaseUser | AnonymousUser) -> set[str]:
    if not user.is_authenticated:
        return set()
    if user.is_superuser:
        return {r.value for r in Role}
    # Memoised on the user object like the permission cache: one query per request at most.
    cached: set[str] | None = getattr(user, "_role_cache", None)
    if cached is None:
        cached = set(user.groups.values_list("name", flat=True))  # type: ignore[attr-defined]
        user._role_cache = cached  # type: ignore[union-attr]
    return set(cached)
