"""ingest_item's references to its source, schema version and batch: checked once per statement, not per row.

A PostgreSQL foreign key is checked by a row-level trigger: for a 20,000-row bulk chunk, 60,000 lookups and
row locks of the same three parent rows, about a third of the chunk's database time (docs/benchmarks.md).
Here the three constraints go (the Django fields keep their on_delete, with ``db_constraint=False``) and
triggers keep the same guarantees on PostgreSQL:

- after each INSERT statement, one pass over its new rows (a transition table) collects the distinct
  references; the parent rows are locked FOR KEY SHARE, as a foreign key does, so they cannot go away before
  the inserting transaction ends; a reference to a missing row raises SQLSTATE 23503 (foreign_key_violation,
  Django's IntegrityError) and the whole statement is undone;
- an UPDATE that changes one of the three columns is checked the same way, per changed row (PostgreSQL does
  not allow a transition table on an ``UPDATE OF columns`` trigger, and a transition table on every UPDATE
  would tax scoring and routing, which update thousands of items per chunk without touching these columns);
- deleting a source, schema version or batch, or changing its id, while an item refers to it raises 23503:
  one probe of the index on that column of ingest_item (item_unique_external_id leads with source_id).

Unlike a foreign key the check is immediate (at the end of each statement, not deferred to commit): parents
must exist before their items, which is how every writer here works. TRUNCATE of a parent table alone is not
refused (a TRUNCATE of both, as Django's test flush does, stays possible). Under REPEATABLE READ a delete of a
parent could miss an item committed after its snapshot; the project runs READ COMMITTED.
On SQLite nothing is created: the ORM's on_delete still applies there.
"""

from __future__ import annotations

from typing import Any

import django.db.models.deletion
from django.db import migrations, models

ITEM = "ingest_item"
# (parent table, ingest_item column)
REFERENCES = [("ingest_source", "source_id"), ("ingest_schemaversion", "schema_version_id"),
              ("ingest_ingestbatch", "batch_id")]

CREATE = """
CREATE OR REPLACE FUNCTION ingest_item_refs_assert(parent regclass, col text, ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    present bigint[];
    missing bigint;
BEGIN
    ids := array_remove(ids, NULL);
    IF ids IS NULL OR cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    -- One statement locks and counts, so a row deleted concurrently is either locked here (the delete
    -- waits, then sees the items) or missing here (this statement fails).
    EXECUTE format('SELECT array_agg(id) FROM (SELECT id FROM %s WHERE id = ANY ($1) FOR KEY SHARE) p', parent)
        INTO present USING ids;
    IF coalesce(cardinality(present), 0) < cardinality(ids) THEN
        SELECT m INTO missing FROM unnest(ids) m WHERE m <> ALL (coalesce(present, '{}')) LIMIT 1;
        RAISE foreign_key_violation USING
            MESSAGE = format('insert or update on table "ingest_item" violates foreign key: %s=%s is not present '
                             'in table "%s"', col, missing, parent),
            DETAIL = format('Key (%s)=(%s) is not present in table "%s".', col, missing, parent),
            TABLE = 'ingest_item', COLUMN = col, CONSTRAINT = 'ingest_item_' || col || '_refs';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION ingest_item_refs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sources bigint[];
    versions bigint[];
    batches bigint[];
BEGIN
    -- One hash aggregate over the statement's rows; the arrays hold a handful of ids.
    SELECT array_agg(DISTINCT source_id), array_agg(DISTINCT schema_version_id), array_agg(DISTINCT batch_id)
      INTO sources, versions, batches
      FROM (SELECT DISTINCT source_id, schema_version_id, batch_id FROM new_items) refs;
    PERFORM ingest_item_refs_assert('ingest_source', 'source_id', sources);
    PERFORM ingest_item_refs_assert('ingest_schemaversion', 'schema_version_id', versions);
    PERFORM ingest_item_refs_assert('ingest_ingestbatch', 'batch_id', batches);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION ingest_item_refs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.source_id IS DISTINCT FROM OLD.source_id THEN
        PERFORM ingest_item_refs_assert('ingest_source', 'source_id', ARRAY[NEW.source_id]);
    END IF;
    IF NEW.schema_version_id IS DISTINCT FROM OLD.schema_version_id THEN
        PERFORM ingest_item_refs_assert('ingest_schemaversion', 'schema_version_id', ARRAY[NEW.schema_version_id]);
    END IF;
    IF NEW.batch_id IS DISTINCT FROM OLD.batch_id THEN
        PERFORM ingest_item_refs_assert('ingest_ingestbatch', 'batch_id', ARRAY[NEW.batch_id]);
    END IF;
    RETURN NULL;
END $$;

-- TG_ARGV[0]: the ingest_item column that refers to this table's id.
CREATE OR REPLACE FUNCTION ingest_item_parent_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    referenced boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM ingest_item WHERE %I = $1)', TG_ARGV[0])
        INTO referenced USING OLD.id;
    IF referenced THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('update or delete on table "%s" violates foreign key: %s=%s is still referenced from '
                             'table "ingest_item"', TG_TABLE_NAME, TG_ARGV[0], OLD.id),
            DETAIL = format('Key (id)=(%s) is still referenced from table "ingest_item".', OLD.id),
            TABLE = TG_TABLE_NAME, CONSTRAINT = 'ingest_item_' || TG_ARGV[0] || '_refs';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER ingest_item_refs_insert AFTER INSERT ON ingest_item
    REFERENCING NEW TABLE AS new_items
    FOR EACH STATEMENT EXECUTE FUNCTION ingest_item_refs_inserted();
CREATE TRIGGER ingest_item_refs_update AFTER UPDATE OF source_id, schema_version_id, batch_id ON ingest_item
    FOR EACH ROW
    WHEN (OLD.source_id IS DISTINCT FROM NEW.source_id OR OLD.schema_version_id IS DISTINCT FROM NEW.schema_version_id
          OR OLD.batch_id IS DISTINCT FROM NEW.batch_id)
    EXECUTE FUNCTION ingest_item_refs_updated();
"""

PARENT = """
CREATE TRIGGER {table}_items_guard_delete BEFORE DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION ingest_item_parent_guard('{column}');
CREATE TRIGGER {table}_items_guard_update BEFORE UPDATE OF id ON {table}
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION ingest_item_parent_guard('{column}');
"""

DROP = """
DROP TRIGGER IF EXISTS ingest_item_refs_insert ON ingest_item;
DROP TRIGGER IF EXISTS ingest_item_refs_update ON ingest_item;
""" + "".join(
    f"DROP TRIGGER IF EXISTS {table}_items_guard_delete ON {table};\n"
    f"DROP TRIGGER IF EXISTS {table}_items_guard_update ON {table};\n"
    for table, _ in REFERENCES
) + """
DROP FUNCTION IF EXISTS ingest_item_refs_inserted();
DROP FUNCTION IF EXISTS ingest_item_refs_updated();
DROP FUNCTION IF EXISTS ingest_item_parent_guard();
DROP FUNCTION IF EXISTS ingest_item_refs_assert(regclass, text, bigint[]);
"""


def create_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    # params=None: the SQL is sent as is (no %-interpolation).
    schema_editor.execute(CREATE, params=None)
    for table, column in REFERENCES:
        schema_editor.execute(PARENT.format(table=table, column=column), params=None)


def drop_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0004_item_lean_indexes"),
    ]

    # Forwards: the foreign keys go, then the triggers come. Backwards: the triggers go first, then the
    # foreign keys come back (PostgreSQL validates every existing row when it adds them).
    operations = [
        migrations.AlterField(
            model_name="item",
            name="batch",
            field=models.ForeignKey(
                blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.PROTECT,
                related_name="items", to="ingest.ingestbatch",
            ),
        ),
        migrations.AlterField(
            model_name="item",
            name="schema_version",
            field=models.ForeignKey(
                db_constraint=False, on_delete=django.db.models.deletion.PROTECT, to="ingest.schemaversion"
            ),
        ),
        migrations.AlterField(
            model_name="item",
            name="source",
            field=models.ForeignKey(
                db_constraint=False, db_index=False, on_delete=django.db.models.deletion.PROTECT,
                related_name="items", to="ingest.source",
            ),
        ),
        migrations.RunPython(create_triggers, drop_triggers),
    ]
