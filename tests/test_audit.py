import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from reviewapp.core.audit import audit_record, audit_verify
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
