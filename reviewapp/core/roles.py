"""The three roles, as Django groups built from the Capability permissions."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

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


def can(user: AbstractBaseUser | AnonymousUser, capability: str) -> bool:
    return bool(user.is_authenticated and user.has_perm(f"core.{capability}"))


def user_roles(user: AbstractBaseUser | AnonymousUser) -> set[str]:
    if not user.is_authenticated:
        return set()
    if user.is_superuser:
        return {r.value for r in Role}
    return set(user.groups.values_list("name", flat=True))  # type: ignore[attr-defined]
