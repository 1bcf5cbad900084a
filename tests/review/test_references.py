"""review_decision's references to item, prediction, model version and policy, enforced by triggers on
PostgreSQL (migration review/0003, reviewapp.core.setrefs): the database refuses what a foreign key would
refuse, and the ORM's on_delete behaviour is what it was. ingest_item.prediction_id and policy_id stay real
foreign keys (a row trigger on routing's UPDATE measured no cheaper than their checks at COMMIT)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import ProtectedError

from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision
from tests.scoring.test_references import (
    MISSING,
    World,
    build_world,
    execute,
    foreign_keys,
    integrity_error,
    make_item,
    sqlstate,
    triggers_named,
)

pytestmark = pytest.mark.django_db

COLUMNS = ("item_id", "prediction_id", "model_version_id", "policy_id")
PARENTS = {"item_id": "ingest_item", "prediction_id": "scoring_prediction",
           "model_version_id": "scoring_modelversion", "policy_id": "review_policy"}
DECISION = """INSERT INTO review_decision (item_id, prediction_id, model_version_id, policy_id, label, origin,
                                           is_current, reason, created_at) VALUES {values}"""
DECISION_ROW = "(%s, %s, %s, %s, 'a', 'model', false, '', now())"


@pytest.fixture
def world(admin_user: Any) -> World:
    return build_world(admin_user)


def refs(world: World) -> dict[str, int]:
    return {"item_id": world.prediction.item_id, "prediction_id": world.prediction.pk,
            "model_version_id": world.model_version.pk, "policy_id": world.policy.pk}


def insert(*rows: dict[str, Any]) -> None:
    execute(DECISION.format(values=", ".join([DECISION_ROW] * len(rows))), [r[c] for r in rows for c in COLUMNS])


def test_postgresql_keeps_real_foreign_keys_only_for_the_other_columns() -> None:
    assert foreign_keys("review_decision") == {"verdict_id", "decided_by_id", "supersedes_id"}
    assert {"prediction_id", "policy_id"} <= foreign_keys("ingest_item")


@pytest.mark.parametrize("column", COLUMNS)
def test_a_decision_with_a_missing_reference_is_refused(world: World, column: str) -> None:
    error = integrity_error(insert, {**refs(world), column: MISSING})
    assert sqlstate(error) == "23503" and f"{column}={MISSING}" in str(error)
    assert not Decision.objects.exists()
    insert({**refs(world), "prediction_id": None, "model_version_id": None, "policy_id": None})  # NULL is fine
    decision = Decision.objects.get()
    error = integrity_error(execute, f"UPDATE review_decision SET {column} = %s WHERE id = %s",  # noqa: S608
                            [MISSING, decision.pk])
    assert sqlstate(error) == "23503"
    Decision.objects.filter(pk=decision.pk).update(**{column: refs(world)[column]})


def test_a_multi_row_insert_with_one_bad_reference_inserts_nothing(world: World) -> None:
    rows = [{**refs(world), "item_id": make_item(world.source, f"m{n}").pk} for n in range(30)]
    rows[17] = {**rows[17], "policy_id": MISSING}
    error = integrity_error(insert, *rows)
    assert f"policy_id={MISSING}" in str(error)
    assert not Decision.objects.exists()
    rows[17] = {**rows[17], "policy_id": world.policy.pk}
    insert(*rows)
    assert Decision.objects.count() == 30


@pytest.mark.parametrize("column", COLUMNS)
def test_a_referenced_parent_cannot_be_deleted_or_renumbered_in_sql(world: World, column: str) -> None:
    insert(refs(world))
    parent_id, table = refs(world)[column], PARENTS[column]
    error = integrity_error(execute, f"DELETE FROM {table} WHERE id = %s", [parent_id])  # noqa: S608
    assert sqlstate(error) == "23503" and f"{column}={parent_id}" in str(error)
    error = integrity_error(execute, f"UPDATE {table} SET id = id + 1000000 WHERE id = %s",  # noqa: S608
                            [parent_id])
    assert sqlstate(error) == "23503"
    # Once nothing refers to it, the parent can go (the prediction refers to the item and the model version).
    execute("DELETE FROM review_decision", [])
    if column in ("item_id", "model_version_id"):
        execute("DELETE FROM scoring_prediction WHERE id = %s", [world.prediction.pk])
    execute(f"DELETE FROM {table} WHERE id = %s", [parent_id])  # noqa: S608


def test_the_orm_still_protects_every_parent_of_a_decision(world: World) -> None:
    insert(refs(world))
    for parent in (world.prediction, world.model_version, world.policy, world.items[0]):
        with pytest.raises(ProtectedError), transaction.atomic():
            parent.delete()
    assert Decision.objects.count() == 1


def test_the_orm_nulls_an_items_prediction_when_the_prediction_goes(world: World) -> None:
    Item.objects.filter(pk=world.items[0].pk).update(prediction=world.prediction)
    world.prediction.delete()  # on_delete=SET_NULL, before the prediction row goes
    assert Item.objects.get(pk=world.items[0].pk).prediction_id is None
    with pytest.raises(ProtectedError), transaction.atomic():
        Item.objects.filter(pk=world.items[1].pk).update(policy=world.policy)
        world.policy.delete()


def test_the_migrations_reverse_to_real_foreign_keys_and_apply_again_on_a_populated_table(world: World) -> None:
    insert(refs(world))
    Item.objects.filter(pk=world.items[0].pk).update(prediction=world.prediction, policy=world.policy)

    def bad_insert() -> None:
        insert({**refs(world), "model_version_id": MISSING})
        execute("SET CONSTRAINTS ALL IMMEDIATE", [])  # a real foreign key is deferred: check it now

    def state() -> tuple[bool, int]:
        return set(COLUMNS) <= foreign_keys("review_decision"), len(triggers_named("review_decision_"))

    executor = MigrationExecutor(connection)
    latest = [node for app in ("scoring", "review") for node in executor.loader.graph.leaf_nodes(app)]
    assert state() == (False, 10)
    execute("SET CONSTRAINTS ALL IMMEDIATE", [])  # no pending trigger events before ALTER TABLE
    MigrationExecutor(connection).migrate([("review", "0002_workspace")])
    try:
        assert state() == (True, 0)
        assert sqlstate(integrity_error(bad_insert)) == "23503"
    finally:
        MigrationExecutor(connection).migrate(latest)
    assert state() == (False, 10)
    assert sqlstate(integrity_error(bad_insert)) == "23503"
    assert Decision.objects.count() == 1
