"""scoring_prediction's references to its item and model version, enforced set-based on PostgreSQL (migration
scoring/0004, reviewapp.core.setrefs): the database refuses what a foreign key would refuse, and the ORM's
on_delete behaviour is what it was."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import ProtectedError

from reviewapp.core.setrefs import reference_triggers
from reviewapp.ingest import services
from reviewapp.ingest.models import Item, SchemaVersion, Source
from reviewapp.review.models import Policy
from scoring.models import ModelVersion, Prediction

pytestmark = pytest.mark.django_db

MISSING = 987_654_321
ID_ONLY = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
PREDICTION = """INSERT INTO scoring_prediction (item_id, model_version_id, probabilities, top_label, confidence,
                                                alternatives, prediction_set, created_at) VALUES {values}"""
PREDICTION_ROW = "(%s, %s, '{}'::jsonb, 'a', 0.9, '[]'::jsonb, '[]'::jsonb, now())"


@dataclass
class World:
    source: Source
    items: list[Item]
    model_version: ModelVersion
    prediction: Prediction
    policy: Policy


def make_item(source: Source, external_id: str) -> Item:
    return Item.objects.create(source=source, external_id=external_id, payload={"id": external_id},
                               payload_sha256=hashlib.sha256(external_id.encode()).hexdigest(),
                               schema_version=SchemaVersion.objects.get(source=source))


@pytest.fixture
def world(admin_user: Any) -> World:
    return build_world(admin_user)


def build_world(admin_user: Any) -> World:
    """A source with three items, a ready model version, a prediction for the first item, and its policy."""
    source = services.source_create(actor=admin_user, slug="refs", name="Refs", labels=["a", "b"],
                                    json_schema=ID_ONLY, id_field="id")
    items = [make_item(source, f"i{n}") for n in range(3)]
    version = ModelVersion.objects.create(source=source, version=1, algorithm="test", status="ready")
    prediction = Prediction.objects.create(item=items[0], model_version=version, probabilities={"a": 0.9, "b": 0.1},
                                           top_label="a", confidence=0.9)
    return World(source, items, version, prediction, Policy.objects.get(source=source))


def execute(sql: str, params: list[Any]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def integrity_error(fn: Any, *args: Any) -> IntegrityError:
    """Run ``fn`` in a savepoint and return the IntegrityError it must raise (the test's transaction goes on)."""
    with pytest.raises(IntegrityError) as caught, transaction.atomic():
        fn(*args)
    return caught.value


def sqlstate(error: IntegrityError) -> str | None:
    return getattr(error.__cause__, "sqlstate", None)


def foreign_keys(table: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT a.attname FROM pg_constraint c
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
               WHERE c.conrelid = %s::regclass AND c.contype = 'f'""",
            [table],
        )
        return {name for (name,) in cursor.fetchall()}


def triggers_named(prefix: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE %s", [prefix + "%"])
        return {name for (name,) in cursor.fetchall()}


def test_reference_triggers_refuses_names_it_would_not_quote() -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        reference_triggers("scoring_prediction", [("item_id; DROP TABLE x", "ingest_item")])
    create, drop = reference_triggers("scoring_prediction", [("item_id", "ingest_item")])
    assert "REFERENCING NEW TABLE" in create and "DROP TRIGGER IF EXISTS scoring_prediction_refs_insert" in drop


def test_postgresql_keeps_no_row_level_foreign_key_for_these_columns() -> None:
    assert foreign_keys("scoring_prediction").isdisjoint({"item_id", "model_version_id"})


@pytest.mark.parametrize("column", ["item_id", "model_version_id"])
def test_a_prediction_with_a_missing_reference_is_refused(world: World, column: str) -> None:
    values = {"item_id": world.items[1].pk, "model_version_id": world.model_version.pk, column: MISSING}
    error = integrity_error(execute, PREDICTION.format(values=PREDICTION_ROW),
                            [values["item_id"], values["model_version_id"]])
    assert sqlstate(error) == "23503" and f"{column}={MISSING}" in str(error)
    assert Prediction.objects.count() == 1
    # An update to a missing row is refused too; to one that exists is fine.
    error = integrity_error(execute, f"UPDATE scoring_prediction SET {column} = %s WHERE id = %s",  # noqa: S608
                            [MISSING, world.prediction.pk])
    assert sqlstate(error) == "23503"
    Prediction.objects.filter(pk=world.prediction.pk).update(item=world.items[2])
    assert Prediction.objects.get().item_id == world.items[2].pk


def test_a_multi_row_insert_with_one_bad_reference_inserts_nothing(world: World) -> None:
    version = ModelVersion.objects.create(source=world.source, version=2, algorithm="test", status="ready")
    items = [make_item(world.source, f"m{n}") for n in range(40)]
    params = [v for item in items for v in (item.pk, version.pk)]
    params[2 * 23] = MISSING  # one row's item
    error = integrity_error(execute, PREDICTION.format(values=", ".join([PREDICTION_ROW] * len(items))), params)
    assert f"item_id={MISSING}" in str(error)
    assert not Prediction.objects.filter(model_version=version).exists()
    params[2 * 23] = items[23].pk
    execute(PREDICTION.format(values=", ".join([PREDICTION_ROW] * len(items))), params)
    assert Prediction.objects.filter(model_version=version).count() == 40


@pytest.mark.parametrize(("table", "column"), [("ingest_item", "item_id"), ("scoring_modelversion",
                                                                           "model_version_id")])
def test_a_referenced_parent_cannot_be_deleted_or_renumbered_in_sql(world: World, table: str, column: str) -> None:
    parent_id = getattr(world.prediction, column)
    error = integrity_error(execute, f"DELETE FROM {table} WHERE id = %s", [parent_id])  # noqa: S608
    assert sqlstate(error) == "23503" and f"{column}={parent_id}" in str(error)
    error = integrity_error(execute, f"UPDATE {table} SET id = id + 1000000 WHERE id = %s",  # noqa: S608
                            [parent_id])
    assert sqlstate(error) == "23503"
    # Once the prediction is gone the parent can go.
    execute("UPDATE ingest_item SET prediction_id = NULL WHERE prediction_id = %s", [world.prediction.pk])
    execute("DELETE FROM scoring_prediction WHERE id = %s", [world.prediction.pk])
    execute(f"DELETE FROM {table} WHERE id = %s", [parent_id])  # noqa: S608


def test_the_orm_still_protects_the_model_version_and_cascades_from_the_item(world: World) -> None:
    with pytest.raises(ProtectedError), transaction.atomic():
        world.model_version.delete()
    # The item that the prediction routed points back at it (ingest_item.prediction_id): the collector nulls
    # that, deletes the prediction, then the item.
    Item.objects.filter(pk=world.items[0].pk).update(prediction=world.prediction)
    world.items[0].delete()
    assert not Prediction.objects.exists() and not Item.objects.filter(pk=world.items[0].pk).exists()
    world.model_version.delete()
    assert not ModelVersion.objects.exists()


def test_the_migration_reverses_to_real_foreign_keys_and_applies_again_on_a_populated_table(world: World) -> None:
    columns = {"item_id", "model_version_id"}

    def bad_insert() -> None:
        execute(PREDICTION.format(values=PREDICTION_ROW), [MISSING, world.model_version.pk])
        execute("SET CONSTRAINTS ALL IMMEDIATE", [])  # a real foreign key is deferred: check it now

    executor = MigrationExecutor(connection)
    latest = [node for app in ("scoring", "review") for node in executor.loader.graph.leaf_nodes(app)]
    assert len(triggers_named("scoring_prediction_")) == 6
    execute("SET CONSTRAINTS ALL IMMEDIATE", [])  # no pending trigger events before ALTER TABLE
    MigrationExecutor(connection).migrate([("scoring", "0003_prediction_item_index")])
    try:
        assert columns <= foreign_keys("scoring_prediction") and triggers_named("scoring_prediction_") == set()
        assert sqlstate(integrity_error(bad_insert)) == "23503"
    finally:
        MigrationExecutor(connection).migrate(latest)
    assert columns.isdisjoint(foreign_keys("scoring_prediction")) and len(triggers_named("scoring_prediction_")) == 6
    assert sqlstate(integrity_error(bad_insert)) == "23503"
    assert Prediction.objects.get() == world.prediction
