"""ingest_item's references to its source, schema version and batch, enforced set-based on PostgreSQL
(migration ingest/0005): the database refuses what a foreign key would refuse, and the ORM's on_delete
behaviour is what it was."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import ProtectedError

from reviewapp.ingest import services
from reviewapp.ingest.models import IngestBatch, Item, SchemaVersion, Source
from reviewapp.review.models import Decision, Label, Policy
from tests.ingest.conftest import payments_frame, to_bytes, upload

pytestmark = pytest.mark.django_db

MISSING = 987_654_321
COLUMNS = ("source_id", "schema_version_id", "batch_id")
INSERT = """INSERT INTO ingest_item (source_id, external_id, payload, payload_sha256, schema_version_id, batch_id,
                                     state, route_reason, attempts, last_error, correlation_id, received_at,
                                     state_changed_at)
            VALUES {values}"""
ID_ONLY = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
ROW = "(%s, %s, '{}'::jsonb, 'x', %s, %s, 'received', '', 0, '', gen_random_uuid(), now(), now())"


@pytest.fixture
def batch(admin_user: Any, source: Source) -> IngestBatch:
    """A processed batch of five labeled payments: items, imported decisions and labels."""
    content = to_bytes(payments_frame(5, labeled=True), "csv")
    batch, _ = services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(content, "p.csv"))
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert (batch.status, batch.accepted) == ("done", 5)
    return batch


def raw_insert(*rows: tuple[Any, ...]) -> None:
    """Insert items by plain SQL, as any client could, each row (source, external id, schema version, batch)."""
    with connection.cursor() as cursor:
        cursor.execute(INSERT.format(values=", ".join([ROW] * len(rows))), [v for row in rows for v in row])


def refs(batch: IngestBatch) -> dict[str, int]:
    return {"source_id": batch.source_id, "schema_version_id": batch.schema_version_id, "batch_id": batch.pk}


def row(values: dict[str, Any], external_id: str) -> tuple[Any, ...]:
    return (values["source_id"], external_id, values["schema_version_id"], values["batch_id"])


def integrity_error(fn: Any, *args: Any) -> IntegrityError:
    """Run ``fn`` in a savepoint and return the IntegrityError it must raise (the test's transaction goes on)."""
    with pytest.raises(IntegrityError) as caught, transaction.atomic():
        fn(*args)
    return caught.value


def sqlstate(error: IntegrityError) -> str | None:
    return getattr(error.__cause__, "sqlstate", None)


def test_postgresql_keeps_no_row_level_foreign_key_for_these_three_columns() -> None:
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT a.attname FROM pg_constraint c
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
               WHERE c.conrelid = 'ingest_item'::regclass AND c.contype = 'f'"""
        )
        foreign_keys = {name for (name,) in cursor.fetchall()}
    assert foreign_keys.isdisjoint(COLUMNS)
    assert {"prediction_id", "policy_id"} <= foreign_keys  # the others stay real foreign keys


@pytest.mark.parametrize("column", COLUMNS)
def test_an_item_with_a_missing_reference_is_refused(batch: IngestBatch, column: str) -> None:
    error = integrity_error(raw_insert, row({**refs(batch), column: MISSING}, "new-1"))
    assert sqlstate(error) == "23503"  # foreign_key_violation
    assert f"{column}={MISSING}" in str(error)
    assert not Item.objects.filter(external_id="new-1").exists()


def test_good_references_and_no_batch_are_accepted(batch: IngestBatch) -> None:
    raw_insert(row(refs(batch), "new-1"), row({**refs(batch), "batch_id": None}, "new-2"))
    assert Item.objects.filter(external_id__in=["new-1", "new-2"]).count() == 2


def test_a_multi_row_insert_with_one_bad_reference_inserts_nothing(batch: IngestBatch) -> None:
    before = Item.objects.count()
    rows = [row(refs(batch), f"new-{n}") for n in range(50)]
    rows[37] = row({**refs(batch), "schema_version_id": MISSING}, "new-37")
    error = integrity_error(raw_insert, *rows)
    assert f"schema_version_id={MISSING}" in str(error)
    assert Item.objects.count() == before


def test_changing_an_items_reference_to_a_missing_row_is_refused(batch: IngestBatch) -> None:
    item = Item.objects.filter(batch=batch).first()
    for column in COLUMNS:
        with pytest.raises(IntegrityError), transaction.atomic():
            Item.objects.filter(pk=item.pk).update(**{column: MISSING})
    # A change to another row that exists is fine, and so is no batch.
    other = IngestBatch.objects.create(source=batch.source, schema_version=batch.schema_version, filename="o.csv",
                                       file_format="csv", content_sha256="o" * 64)
    Item.objects.filter(pk=item.pk).update(batch=other)
    Item.objects.filter(pk=item.pk).update(batch=None)
    item.refresh_from_db()
    assert item.batch_id is None


@pytest.mark.parametrize(("table", "column"), [("ingest_source", "source_id"),
                                               ("ingest_schemaversion", "schema_version_id"),
                                               ("ingest_ingestbatch", "batch_id")])
def test_a_referenced_parent_cannot_be_deleted_or_renumbered_in_sql(batch: IngestBatch, table: str,
                                                                    column: str) -> None:
    parent_id = refs(batch)[column]

    def execute(sql: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(sql, [parent_id])

    error = integrity_error(execute, f"DELETE FROM {table} WHERE id = %s")  # noqa: S608 - constant names
    assert sqlstate(error) == "23503" and f"{column}={parent_id}" in str(error)
    error = integrity_error(execute, f"UPDATE {table} SET id = id + 1000000 WHERE id = %s")  # noqa: S608
    assert sqlstate(error) == "23503"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} WHERE id = %s", [parent_id])  # noqa: S608
        assert cursor.fetchone()[0] == 1


def test_a_parent_whose_items_are_gone_can_be_deleted_in_sql(batch: IngestBatch) -> None:
    Label.objects.filter(item__batch=batch).delete()
    Decision.objects.filter(item__batch=batch).delete()
    Item.objects.filter(batch=batch).delete()
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM ingest_ingestbatch WHERE id = %s", [batch.pk])
        assert cursor.rowcount == 1


def test_the_orm_still_protects_referenced_parents(batch: IngestBatch) -> None:
    source, version = batch.source, batch.schema_version
    for parent in (batch, version, source):
        with pytest.raises(ProtectedError), transaction.atomic():
            parent.delete()
    assert Item.objects.filter(batch=batch).count() == 5


def test_the_orm_still_cascades_from_a_source_without_items(admin_user: Any) -> None:
    source = services.source_create(actor=admin_user, slug="empty", name="Empty", labels=["a", "b"],
                                    json_schema=ID_ONLY, id_field="id")
    assert SchemaVersion.objects.filter(source=source).exists() and Policy.objects.filter(source=source).exists()
    source.delete()
    assert not SchemaVersion.objects.filter(source_id=source.pk).exists()
    assert not Policy.objects.filter(source_id=source.pk).exists()


def test_the_migration_reverses_to_real_foreign_keys_and_applies_again_on_a_populated_table(
    batch: IngestBatch,
) -> None:
    def foreign_keys() -> set[str]:
        with connection.cursor() as cursor:
            cursor.execute(
                """SELECT a.attname FROM pg_constraint c
                   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                   WHERE c.conrelid = 'ingest_item'::regclass AND c.contype = 'f'"""
            )
            return {name for (name,) in cursor.fetchall()}

    def triggers() -> set[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE %s",
                           ["%items_guard%"])
            guards = {name for (name,) in cursor.fetchall()}
            cursor.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'ingest_item'::regclass "
                           "AND NOT tgisinternal AND tgname LIKE 'ingest_item_refs_%'")  # 0005's own
            return guards | {name for (name,) in cursor.fetchall()}

    def bad_insert() -> None:
        raw_insert(row({**refs(batch), "source_id": MISSING}, "new-1"))
        with connection.cursor() as cursor:  # a real foreign key is deferred: check it now
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

    latest = MigrationExecutor(connection).loader.graph.leaf_nodes("ingest")
    assert set(COLUMNS).isdisjoint(foreign_keys()) and len(triggers()) == 8
    # Items exist (the fixture's batch), so adding the foreign keys back validates real rows.
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no pending trigger events before ALTER TABLE
    MigrationExecutor(connection).migrate([("ingest", "0004_item_lean_indexes")])
    try:
        assert set(COLUMNS) <= foreign_keys() and triggers() == set()
        assert sqlstate(integrity_error(bad_insert)) == "23503"
    finally:
        MigrationExecutor(connection).migrate(latest)
    assert set(COLUMNS).isdisjoint(foreign_keys()) and len(triggers()) == 8
    assert sqlstate(integrity_error(bad_insert)) == "23503"
    assert Item.objects.filter(batch=batch).count() == 5


@pytest.mark.django_db(transaction=True)
def test_the_lock_on_referenced_rows_orders_an_insert_and_a_concurrent_delete(admin_user: Any) -> None:
    """As with a foreign key: an uncommitted insert holds its parents (a delete waits, then is refused), and an
    insert that waits behind an uncommitted delete of its parent is refused once the delete commits."""
    import threading

    import psycopg

    from tests.conftest import database_url_for_worker

    source = services.source_create(actor=admin_user, slug="locks", name="Locks", labels=["a", "b"],
                                    json_schema=ID_ONLY, id_field="id")
    version = SchemaVersion.objects.get(source=source)

    def new_batch(name: str) -> int:
        return IngestBatch.objects.create(source=source, schema_version=version, filename=name, file_format="csv",
                                          content_sha256=name.ljust(64, "0")).pk

    held, doomed = new_batch("held"), new_batch("doomed")
    values = {"source_id": source.pk, "schema_version_id": version.pk}
    url = database_url_for_worker()
    with psycopg.connect(url) as inserter, psycopg.connect(url) as deleter:
        inserter.execute(INSERT.format(values=ROW), list(row({**values, "batch_id": held}, "x1")))
        deleter.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):  # waits for the inserter
            deleter.execute("DELETE FROM ingest_ingestbatch WHERE id = %s", [held])
        deleter.rollback()
        inserter.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            deleter.execute("DELETE FROM ingest_ingestbatch WHERE id = %s", [held])
        deleter.rollback()

        deleter.execute("DELETE FROM ingest_ingestbatch WHERE id = %s", [doomed])  # no items yet: allowed
        timer = threading.Timer(0.5, deleter.commit)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.ForeignKeyViolation):  # waited for the delete, then found nothing
                inserter.execute(INSERT.format(values=ROW), list(row({**values, "batch_id": doomed}, "x2")))
        finally:
            timer.join()
        inserter.rollback()
    assert list(Item.objects.filter(source=source).values_list("external_id", flat=True)) == ["x1"]
    assert not IngestBatch.objects.filter(pk=doomed).exists()
