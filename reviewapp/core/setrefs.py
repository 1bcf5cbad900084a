"""Foreign keys enforced set-based by triggers instead of PostgreSQL's row-level RI triggers.

A PostgreSQL foreign key is checked per row: for a scoring chunk of 2,000 items, thousands of deferred
lookups and row locks at COMMIT (docs/benchmarks.md). ``reference_triggers`` returns the SQL that keeps the
same guarantees for a child table whose Django fields have ``db_constraint=False``:

- after each INSERT statement, one pass over its new rows (a transition table) collects the distinct
  references per column; the parent rows are locked FOR KEY SHARE, as a foreign key does, so they cannot go
  away before the inserting transaction ends; a missing one raises SQLSTATE 23503 (foreign_key_violation,
  Django's IntegrityError) and the whole statement is undone;
- an UPDATE that changes a reference column is checked per changed row (PostgreSQL allows no transition
  table on an ``UPDATE OF columns`` trigger; one on every UPDATE would copy every updated row). So columns
  that are set by UPDATE in bulk gain nothing here: ingest_item.prediction_id measured no cheaper;
- deleting a parent row, or changing its id, while a child row refers to it raises 23503: one probe of an
  index on the child column (each converted column needs one).

Unlike a deferrable foreign key the check is immediate (end of statement, not COMMIT): parents must exist
before their children and children must go before their parents (Django's delete collector orders them so).
TRUNCATE of a parent alone is not refused. Under REPEATABLE READ a parent delete could miss a child committed
after its snapshot; the project runs READ COMMITTED. The SQL is static per column (no EXECUTE), so plpgsql
caches every plan. Run it with ``schema_editor.execute(sql, params=None)`` (no %-interpolation).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
Reference = tuple[str, str]  # (child column, parent table); the parent's key is "id"


def _missing(name: str, child: str, column: str, parent: str, value: str) -> str:
    return f"""RAISE foreign_key_violation USING
            MESSAGE = format('insert or update on table "{child}" violates foreign key: {column}=%s is not '
                             'present in table "{parent}"', {value}),
            DETAIL = format('Key ({column})=(%s) is not present in table "{parent}".', {value}),
            TABLE = '{child}', COLUMN = '{column}', CONSTRAINT = '{name}_{column}';"""


def _statement_check(name: str, child: str, column: str, parent: str) -> str:
    # One statement locks and counts, so a parent deleted concurrently is either locked here (the delete
    # waits, then sees the child) or missing here (this statement fails).
    return f"""
    SELECT array_agg(DISTINCT {column}) INTO ids FROM new_rows WHERE {column} IS NOT NULL;
    IF ids IS NOT NULL THEN
        SELECT array_agg(id) INTO present FROM (SELECT id FROM {parent} WHERE id = ANY (ids) FOR KEY SHARE) p;
        IF coalesce(cardinality(present), 0) < cardinality(ids) THEN
            SELECT m INTO missing FROM unnest(ids) m WHERE m <> ALL (coalesce(present, '{{}}')) LIMIT 1;
            {_missing(name, child, column, parent, "missing")}
        END IF;
    END IF;"""  # noqa: S608 - identifiers checked by reference_triggers


def _row_check(name: str, child: str, column: str, parent: str) -> str:
    return f"""
    IF NEW.{column} IS NOT NULL AND NEW.{column} IS DISTINCT FROM OLD.{column} THEN
        PERFORM 1 FROM {parent} WHERE id = NEW.{column} FOR KEY SHARE;
        IF NOT FOUND THEN
            {_missing(name, child, column, parent, "NEW." + column)}
        END IF;
    END IF;"""


def reference_triggers(child: str, references: Sequence[Reference], *, name: str | None = None) -> tuple[str, str]:
    """(create SQL, drop SQL) for ``child``'s references [(column, parent table)], named ``name`` (default
    ``<child>_refs``; it prefixes every function and must differ from other sets on the same table)."""
    name = name or f"{child}_refs"
    # Identifiers go into the SQL as they are: plain lower-case names only, short enough for every derived name.
    for identifier in (child, name, *(part for ref in references for part in ref)):
        if not _IDENTIFIER.fullmatch(identifier):
            raise ValueError(f"not a plain identifier: {identifier!r}")
    for column, _ in references:
        if len(f"{child}_{column}_guard_delete") > 63 or len(f"{name}_{column}_guard") > 63:
            raise ValueError(f"derived trigger names for {child}.{column} exceed 63 characters")
    columns = [column for column, _ in references]
    changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns)
    create = [f"""
CREATE OR REPLACE FUNCTION {name}_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{"".join(_row_check(name, child, c, p) for c, p in references)}
    RETURN NULL;
END $$;
CREATE TRIGGER {name}_update AFTER UPDATE OF {", ".join(columns)} ON {child}
    FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION {name}_changed();
"""]
    create.append(f"""
CREATE OR REPLACE FUNCTION {name}_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    present bigint[];
    missing bigint;
BEGIN{"".join(_statement_check(name, child, c, p) for c, p in references)}
    RETURN NULL;
END $$;
CREATE TRIGGER {name}_insert AFTER INSERT ON {child} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {name}_inserted();
""")
    drop = [f"DROP TRIGGER IF EXISTS {name}_insert ON {child};\nDROP TRIGGER IF EXISTS {name}_update ON {child};\n"]
    for column, parent in references:
        guard = f"{name}_{column}_guard"
        create.append(f"""
CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {child} WHERE {column} = OLD.id) THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('update or delete on table "{parent}" violates foreign key: {column}=%s is still '
                             'referenced from table "{child}"', OLD.id),
            DETAIL = format('Key (id)=(%s) is still referenced from table "{child}".', OLD.id),
            TABLE = '{parent}', CONSTRAINT = '{name}_{column}';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER {child}_{column}_guard_delete BEFORE DELETE ON {parent}
    FOR EACH ROW EXECUTE FUNCTION {guard}();
CREATE TRIGGER {child}_{column}_guard_update BEFORE UPDATE OF id ON {parent}
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION {guard}();
""")  # noqa: S608 - identifiers checked above
        drop.append(f"DROP TRIGGER IF EXISTS {child}_{column}_guard_delete ON {parent};\n"
                    f"DROP TRIGGER IF EXISTS {child}_{column}_guard_update ON {parent};\n"
                    f"DROP FUNCTION IF EXISTS {guard}();\n")
    drop.append(f"DROP FUNCTION IF EXISTS {name}_inserted();\nDROP FUNCTION IF EXISTS {name}_changed();\n")
    return "".join(create), "".join(drop)


def create_operation(child: str, references: Sequence[Reference], **kwargs: str) -> object:
    """A RunPython operation that creates the triggers on PostgreSQL and drops them when reversed."""
    from django.db import migrations

    create, drop = reference_triggers(child, references, **kwargs)

    def forwards(apps: object, schema_editor: object) -> None:
        if schema_editor.connection.vendor == "postgresql":  # SQLite: the ORM's on_delete only
            schema_editor.execute(create, params=None)

    def backwards(apps: object, schema_editor: object) -> None:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(drop, params=None)

    return migrations.RunPython(forwards, backwards)
