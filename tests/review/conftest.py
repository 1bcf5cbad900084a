from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _nav_placeholders(settings: Any) -> None:
    """Serve placeholders for nav links of areas that are not written yet (see urls_stub)."""
    from tests.review import urls_stub

    if urls_stub.NEEDS_STUB:
        settings.ROOT_URLCONF = "tests.review.urls_stub"


@pytest.fixture(autouse=True)
def _fast_passwords(settings: Any) -> None:
    # Tests here create many users; the production hasher would dominate their run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


