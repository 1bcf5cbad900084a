"""Partition the audit trail into several hash chains so that writers stop queueing on one lock.

Existing rows are chain 0 (the column's default: adding it rewrites no row, so the append-only trigger
is not involved) and chain 0 simply continues from its last row.

On PostgreSQL, ``core_audit_append`` appends events in one round trip: it takes a free chain's advisory
lock, reads that chain's head, and hashes and inserts the rows. The body each hash covers (canonical JSON
of the event) is built by Python (reviewapp.core.audit); PostgreSQL computes sha256(prev_hash || body),
and ``audit_verify`` re-checks every hash in Python.
"""

from django.db import migrations, models

CREATE = """
CREATE OR REPLACE FUNCTION core_audit_append(ns integer, preferred integer, chains integer, entries jsonb)
RETURNS TABLE (event_id bigint, chain_id integer, prev text, digest text) AS $$
DECLARE
    i integer;
    c integer;
    head text;
    r jsonb;
BEGIN
    -- The first chain nobody holds, starting at the caller's preferred one. A chain this transaction
    -- already holds is taken again at once (advisory locks are re-entrant), so a transaction only
    -- ever blocks while it holds no chain: writers cannot deadlock on chains.
    c := NULL;
    FOR i IN 0 .. chains - 1 LOOP
        IF pg_try_advisory_xact_lock(ns, (preferred + i) %% chains) THEN
            c := (preferred + i) %% chains;
            EXIT;
        END IF;
    END LOOP;
    IF c IS NULL THEN
        c := preferred %% chains;
        PERFORM pg_advisory_xact_lock(ns, c);
    END IF;
    -- A statement of its own, so it reads with a snapshot taken after the lock was granted (READ
    -- COMMITTED): the previous holder's committed rows are visible.
    SELECT e.hash INTO head FROM core_auditevent AS e WHERE e.chain = c ORDER BY e.id DESC LIMIT 1;
    head := coalesce(head, repeat('0', 64));
    FOR r IN SELECT t.value FROM jsonb_array_elements(entries) WITH ORDINALITY AS t(value, n) ORDER BY t.n LOOP
        prev := head;
        digest := encode(sha256(convert_to(head || (r ->> 'body'), 'UTF8')), 'hex');
        INSERT INTO core_auditevent (created_at, actor_id, actor_label, verb, object_type, object_id, before,
                                     after, correlation_id, chain, prev_hash, hash)
        VALUES ((r ->> 'created_at')::timestamptz, (r ->> 'actor_id')::bigint, r ->> 'actor_label', r ->> 'verb',
                r ->> 'object_type', r ->> 'object_id', NULLIF(r -> 'before', 'null'::jsonb),
                NULLIF(r -> 'after', 'null'::jsonb), r ->> 'correlation_id', c, head, digest)
        RETURNING id INTO event_id;
        chain_id := c;
        RETURN NEXT;
        head := digest;
    END LOOP;
END;
$$ LANGUAGE plpgsql VOLATILE;
"""
DROP = "DROP FUNCTION IF EXISTS core_audit_append(integer, integer, integer, jsonb);"


def create_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=())


def drop_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("core", "0002_audit_append_only")]

    operations = [
        migrations.AddField(
            model_name="auditevent",
            name="chain",
            field=models.PositiveSmallIntegerField(db_default=0, default=0),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["chain", "id"], name="audit_chain_idx"),
        ),
        migrations.RunPython(create_function, drop_function),
    ]
