"""Claim-next on PostgreSQL: one statement finds the user's live claim or claims the next open task, so a
claim is that statement and the audit write (one round trip each)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from reviewapp.core.audit import audit_verify
from reviewapp.core.models import AuditEvent
from reviewapp.review.models import ReviewTask
from reviewapp.review.services import task_claim_next
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_scored_items

pytestmark = pytest.mark.django_db


def test_claim_next_is_one_statement_and_one_audit_write(django_assert_max_num_queries):
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    user = UserFactory(role="analyst")
    # One statement: the claim, the item's move and the audit event (no savepoint, no second statement).
    with django_assert_max_num_queries(1):
        task = task_claim_next(user=user, source=source)
    assert task.state == "claimed" and task.claimed_by_id == user.pk
    with connection.cursor() as cursor:  # inside a caller's transaction, its commit stays durable
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    with django_assert_max_num_queries(1):  # the held claim: found and renewed by the same statement
        again = task_claim_next(user=user, source=source)
    assert again.pk == task.pk
    assert AuditEvent.objects.filter(verb="task.claimed").count() == 1
    assert list(audit_verify()) == []


def test_the_held_claim_comes_back_with_a_fresh_lease_and_nothing_else_is_claimed(settings):
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    user = UserFactory(role="analyst")
    task = task_claim_next(user=user)
    old_lease = timezone.now() + timedelta(seconds=30)
    ReviewTask.objects.filter(pk=task.pk).update(lease_expires_at=old_lease)
    again = task_claim_next(user=user)
    assert again.pk == task.pk and getattr(again, "was_held", False)
    assert again.lease_expires_at > old_lease
    assert ReviewTask.objects.get(pk=task.pk).lease_expires_at == again.lease_expires_at
    assert ReviewTask.objects.filter(state="claimed").count() == 1


def test_an_expired_claim_or_one_in_another_source_is_not_the_held_one():
    cards = make_payments_source(slug="cards", thresholds={})
    payments = make_payments_source(slug="payments", thresholds={})
    make_scored_items(cards, [("legit", 0.5)])
    make_scored_items(payments, [("legit", 0.5), ("legit", 0.6)])
    user = UserFactory(role="analyst")
    held = task_claim_next(user=user, source=cards)
    # Asking in another source claims there: the held claim is in cards.
    other = task_claim_next(user=user, source=payments)
    assert other.source_id == payments.pk and other.pk != held.pk
    # Once the lease ran out, the claim is not handed back as held; the next open task is claimed.
    ReviewTask.objects.filter(claimed_by=user).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    fresh = task_claim_next(user=user, source=payments)
    assert fresh.pk not in (held.pk, other.pk) and fresh.source_id == payments.pk


@pytest.mark.django_db(transaction=True)
def test_a_claim_outside_a_transaction_commits_with_its_audit_event_in_one_statement():
    """Autocommit (as in a request): the claim, the item's move and its audit event land together, and the
    event's hash, computed by PostgreSQL over the body Python built, verifies."""
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5)])
    user = UserFactory(role="analyst", username="zoë \"quoted\" <b>")
    assert not connection.in_atomic_block
    task = task_claim_next(user=user, source=source)
    event = AuditEvent.objects.get(verb="task.claimed")
    assert event.object_id == str(task.pk) and event.actor_id == user.pk
    assert event.after == {"state": "claimed", "claimed_by": user.pk, "item": task.item_id, "kind": task.kind,
                           "lease_expires_at": task.lease_expires_at.isoformat()}
    assert event.before == {"state": "open", "claimed_by": None, "lease_expires_at": None}
    assert ReviewTask.objects.get(pk=task.pk).state == "claimed"
    assert list(audit_verify()) == []


@pytest.mark.django_db(transaction=True)
def test_the_claim_skips_the_flush_wait_only_in_its_own_transaction():
    """Autocommit: the statement sets synchronous_commit off for itself. Inside a caller's transaction it must
    not (that commit may carry durable work, such as a verdict)."""
    from django.db import transaction

    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    first, second = UserFactory(role="analyst"), UserFactory(role="analyst")
    captured: list[str] = []

    def spy(execute, sql, params, many, context):
        captured.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(spy):
        assert task_claim_next(user=first, source=source) is not None
        own = captured[-1]
        with transaction.atomic():
            assert task_claim_next(user=second, source=source) is not None
            inside = captured[-1]
            with connection.cursor() as cursor:
                cursor.execute("SHOW synchronous_commit")
                assert cursor.fetchone()[0] == "on"
    assert "set_config('synchronous_commit', 'off', true)" in own
    assert "synchronous_commit" not in inside
