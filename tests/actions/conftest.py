"""Fixtures for the action plane: a real HTTP receiver on loopback, allow-listed; sources, a second
admin, and a private Celery queue."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from actions.models import EgressAllowRule
from reviewapp.ingest.models import Source
from tests.actions.helpers import Receiver
from tests.factories import UserFactory, make_payments_source


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    """Users are made per test; the production hasher would spend most of the time hashing."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    rec.thread.start()
    yield rec
    rec.release.set()
    rec.server.shutdown()
    rec.server.server_close()


@pytest.fixture
def loopback_allowed(db: None) -> EgressAllowRule:
    return EgressAllowRule.objects.create(cidr_or_host="127.0.0.1/32", comment="test receiver")


@pytest.fixture
def source(db: None) -> Source:
    return make_payments_source(slug="payments")


@pytest.fixture
def bea(db: None) -> Any:
    """A second admin (the conftest's admin_user is "adam")."""
    return UserFactory(username="bea", role="admin")


@pytest.fixture
def private_queue(settings: Any) -> Iterator[str]:
    """Deliveries go to a queue no shared worker reads (tests that deliver by hand, or run their own
    worker); the queue is dropped afterwards."""
    name = f"actions-test-{uuid.uuid4().hex[:8]}"
    settings.ACTIONS_QUEUE = name
    yield name
    redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(name)


