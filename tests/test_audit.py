import json
import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from reviewapp.core.audit import audit_chain_heads, audit_record, audit_verify
from reviewapp.core.models import AuditEvent


def _write_events(n: int) -> None:
    for i in range(n):
        with transaction.atomic():
            audit_record(actor=None, verb="test.event", object_type="thing", object_id=i, after={"i": i, "x": 0.1})


@pytest.mark.django_db(transaction=True)
def test_chain_verifies_and_command_succeeds(capsys):
    _write_events(5)
    assert list(audit_verify()) == []
    call_command("verify_audit")
    assert "5 events verified" in capsys.readouterr().out


@pytest.mark.django_db(transaction=True)
def test_audit_outside_transaction_is_refused():
    with pytest.raises(RuntimeError):
        audit_record(actor=None, verb="x", object_type="y", object_id=1)


@pytest.mark.django_db(transaction=True)
def test_postgres_trigger_refuses_update_and_delete():
    if connection.vendor != "postgresql":
        pytest.fail("this suite runs against PostgreSQL; set DATABASE_URL")
    _write_events(1)
    from django.db import DatabaseError

    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.update(verb="tampered")
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.all().delete()


@pytest.mark.django_db(transaction=True)
def test_tampering_is_detected_and_first_break_named():
    _write_events(4)
    second = AuditEvent.objects.order_by("id")[1]
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE core_auditevent DISABLE TRIGGER USER")
        try:
            cursor.execute("UPDATE core_auditevent SET after = %s WHERE id = %s", ['{"i": 99}', second.pk])
        finally:
            cursor.execute("ALTER TABLE core_auditevent ENABLE TRIGGER USER")
    breaks = list(audit_verify())
    assert breaks[0].event_id == second.pk
    with pytest.raises(CommandError, match=f"#{second.pk}"):
        call_command("verify_audit")


@pytest.mark.django_db(transaction=True)
def test_deleted_row_is_detected():
    _write_events(3)
    middle = AuditEvent.objects.order_by("id")[1]
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE core_auditevent DISABLE TRIGGER USER")
        try:
            cursor.execute("DELETE FROM core_auditevent WHERE id = %s", [middle.pk])
        finally:
            cursor.execute("ALTER TABLE core_auditevent ENABLE TRIGGER USER")
    breaks = list(audit_verify())
    assert breaks and breaks[0].event_id > middle.pk


def _in_thread(work, *args):
    """Run ``work`` in a thread with its own database connection; return its result or raise its error."""
    from django.db import connections

    out: dict = {}

    def body():
        try:
            out["value"] = work(*args)
        except BaseException as exc:  # re-raised in the caller
            out["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


@pytest.mark.django_db(transaction=True)
def test_a_writer_does_not_wait_for_another_open_transaction():
    """The point of several chains: while one transaction holds its chain (until its commit), another
    writer takes a free chain at once instead of queueing behind it (lock_timeout would fire if it waited)."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with transaction.atomic():
            event = audit_record(actor=None, verb="test.hold", object_type="thing", object_id=1)
            holding.set()
            assert release.wait(60)
            return event.chain

    thread, held = _in_thread(hold)
    assert holding.wait(60)
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '5s'")
            mine = audit_record(actor=None, verb="test.free", object_type="thing", object_id=2)
    finally:
        release.set()
        thread.join()
    assert "error" not in held, held.get("error")
    assert mine.chain != held["value"]
    assert list(audit_verify()) == []


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_keep_every_chain_intact():
    """32 threads writing at once, some several events per transaction: every chain links up, each
    transaction's events share one chain, and the writers spread over several chains."""
    barrier = threading.Barrier(32)

    def write(n):
        barrier.wait(60)
        chains = []
        for i in range(5):
            with transaction.atomic():
                first = audit_record(actor=None, verb="test.many", object_type="thing", object_id=f"{n}-{i}")
                second = audit_record(actor=None, verb="test.many", object_type="thing", object_id=f"{n}-{i}b")
                chains.append((first.chain, second.chain))
        return chains

    threads = [_in_thread(write, n) for n in range(32)]
    for thread, _out in threads:
        thread.join()
    results = [out for _t, out in threads]
    assert all("error" not in out for out in results), [out.get("error") for out in results]
    pairs = [pair for out in results for pair in out["value"]]
    assert all(a == b for a, b in pairs)  # a transaction stays on its chain
    assert AuditEvent.objects.count() == 32 * 5 * 2
    assert AuditEvent.objects.values("chain").distinct().count() > 1
    assert list(audit_verify()) == []
    heads = audit_chain_heads()
    assert {h["chain"] for h in heads} == set(AuditEvent.objects.values_list("chain", flat=True))
    for head in heads:
        assert head["id"] == AuditEvent.objects.filter(chain=head["chain"]).order_by("-id").first().pk


@pytest.mark.django_db(transaction=True)
def test_a_row_moved_to_another_chain_is_detected():
    with transaction.atomic():
        audit_record(actor=None, verb="test.a", object_type="thing", object_id=1)
        audit_record(actor=None, verb="test.a", object_type="thing", object_id=2)
    first, second = AuditEvent.objects.order_by("id")
    other = (first.chain + 1) % 32
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE core_auditevent DISABLE TRIGGER USER")
        try:
            cursor.execute("UPDATE core_auditevent SET chain = %s WHERE id = %s", [other, first.pk])
        finally:
            cursor.execute("ALTER TABLE core_auditevent ENABLE TRIGGER USER")
    assert [b.event_id for b in audit_verify()] == [second.pk]  # the chain it left lost its link
    with pytest.raises(CommandError, match=f"#{second.pk}"):
        call_command("verify_audit")


@pytest.mark.django_db(transaction=True)
def test_rows_from_before_chains_become_chain_zero_which_continues():
    """The migration: a trail written by the single-chain code (no chain column) is chain 0 after
    0003, verifies as before, and chain 0 continues from its last row."""
    from django.db.migrations.executor import MigrationExecutor

    from reviewapp.core.audit import GENESIS_HASH, event_digest

    executor = MigrationExecutor(connection)
    executor.migrate([("core", "0002_audit_append_only")])
    try:
        prev = GENESIS_HASH
        with connection.cursor() as cursor:
            for i in range(3):  # what the old writer stored: one chain in id order
                now = timezone.now()
                digest = event_digest(
                    prev_hash=prev,
                    created_at=now,
                    actor_id=None,
                    actor_label="system",
                    verb="legacy.event",
                    object_type="thing",
                    object_id=str(i),
                    before=None,
                    after={"i": i},
                    correlation_id="",
                )
                cursor.execute(
                    "INSERT INTO core_auditevent (created_at, actor_id, actor_label, verb, object_type, object_id,"
                    " before, after, correlation_id, prev_hash, hash) VALUES (%s, NULL, 'system', 'legacy.event',"
                    " 'thing', %s, NULL, %s, '', %s, %s)",
                    [now, str(i), json.dumps({"i": i}), prev, digest],
                )
                prev = digest
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
    legacy = list(AuditEvent.objects.order_by("id"))
    assert [e.chain for e in legacy] == [0, 0, 0]
    assert list(audit_verify()) == []
    with override_settings(AUDIT_CHAINS=1), transaction.atomic():
        after = audit_record(actor=None, verb="test.after", object_type="thing", object_id=9)
    assert after.chain == 0 and after.prev_hash == legacy[-1].hash
    assert list(audit_verify()) == []


@pytest.mark.django_db(transaction=True)
def test_hashes_made_by_postgresql_match_the_python_verification():
    """PostgreSQL hashes the body Python built; unicode, quotes, backslashes and nulls come back equal."""
    from tests.factories import UserFactory

    user = UserFactory(username="zoë")
    tricky = {"text": 'é ✓ 😀 "quoted" \\ back\nline', "n": 1.5, "nested": [None, True, {"k": "v"}], "empty": ""}
    with transaction.atomic():
        events = [
            audit_record(actor=user, verb="test.unicode", object_type="thing", object_id="ü-1", after=tricky),
            audit_record(actor=None, verb="test.null", object_type="thing", object_id=2, before=None, after=None),
        ]
    stored = list(AuditEvent.objects.order_by("id"))
    assert [e.pk for e in stored] == [e.pk for e in events]
    assert stored[0].after == tricky and stored[0].actor_label == "zoë" and stored[0].actor_id == user.pk
    assert stored[1].before is None and stored[1].after is None
    assert AuditEvent.objects.filter(before__isnull=True).count() == 2
    assert [(e.chain, e.prev_hash, e.hash) for e in stored] == [(e.chain, e.prev_hash, e.hash) for e in events]
    assert stored[1].prev_hash == stored[0].hash
    assert list(audit_verify()) == []
