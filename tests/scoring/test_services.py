"""Training, promotion, scoring and reconciling through the services, against the database."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from reviewapp.core.errors import Conflict
from reviewapp.core.models import AuditEvent
from reviewapp.demo import payments
from reviewapp.ingest.models import Item
from reviewapp.review.models import Label
from scoring import services
from scoring.artifacts import artifact_path
from scoring.estimators import get_family
from scoring.models import ModelVersion, Prediction
from tests.factories import make_payments_source
from tests.scoring.helpers import add_labeled_history, add_received

pytestmark = pytest.mark.django_db
ROUTED = {Item.State.SCORED, Item.State.AUTO_DECIDED, Item.State.QUEUED}


@pytest.fixture
def source(artifact_root: Path):
    src = make_payments_source()
    add_labeled_history(src, payments.generate_payments(2000, seed=21))
    return src


@pytest.fixture
def fresh(source) -> list[Item]:
    return add_received(source, payments.generate_payments(150, seed=22, start=500_000))


def verbs() -> list[str]:
    return list(AuditEvent.objects.order_by("id").values_list("verb", flat=True))


def test_first_model_becomes_champion_with_its_registry_record(source, admin_user: Any) -> None:
    mv = services.model_train(source=source, actor=admin_user)
    assert mv.status == ModelVersion.Status.READY and mv.is_champion and mv.promoted_at and mv.trained_at
    assert mv.version == 1 and mv.algorithm == "logreg" and mv.created_by == admin_user
    assert mv.schema_version.label == "1.0"
    assert mv.feature_spec["text"] == ["description"]
    assert mv.params["C"] == 1.0 and mv.params["split"] == [0.6, 0.2, 0.2]
    labels = list(Label.objects.filter(source=source).order_by("created_at", "id"))
    pairs = "".join(f"{lab.item_id}\t{lab.label}\n" for lab in labels)
    assert mv.label_snapshot["count"] == 2000
    assert mv.label_snapshot["sha256"] == hashlib.sha256(pairs.encode()).hexdigest()
    assert mv.label_snapshot["max_label_id"] == labels[-1].pk and mv.label_snapshot["per_origin"] == {"import": 2000}
    assert mv.metrics["roc_auc"] > 0.8 and mv.metrics["ece"] < 0.05
    assert mv.metrics["promotion"]["promoted"] is True
    assert artifact_path(mv.artifact_sha256).exists()
    assert verbs() == ["model.training_started", "model.trained", "model.promoted"]


def test_too_few_labels_leave_a_failed_version_with_the_reason(artifact_root: Path) -> None:
    src = make_payments_source(slug="small")
    add_labeled_history(src, payments.generate_payments(30, seed=3))
    mv = services.model_train(source=src, actor=None)
    assert mv.status == ModelVersion.Status.FAILED and not mv.is_champion
    assert "not enough labels to train: 30" in mv.error
    assert verbs() == ["model.training_started", "model.failed"]
    # The training task is idempotent: a failed version is not trained again.
    assert services.model_train_version(model_version_id=mv.pk).status == ModelVersion.Status.FAILED


def test_promotion_comparison_and_rollback(source, admin_user: Any) -> None:
    v1 = services.model_train(source=source, actor=admin_user)
    v2 = services.model_train(source=source, actor=admin_user, promote=False)
    assert not v2.is_champion and v2.metrics["promotion"]["promoted"] is False
    # Same labels, same seed: the candidate is not worse than the champion on the same held-out part.
    v3 = services.model_train(source=source, actor=admin_user)
    comparison = v3.metrics["promotion"]["comparison"]
    assert comparison["champion_version"] == 1 and comparison["n"] == 400
    assert comparison["candidate_macro_f1"] == pytest.approx(comparison["champion_macro_f1"])
    assert v3.is_champion
    v1.refresh_from_db()
    assert not v1.is_champion
    # Rollback is a promotion of an earlier version.
    services.model_promote(model_version=v1, actor=admin_user)
    champions = list(ModelVersion.objects.filter(source=source, is_champion=True).values_list("version", flat=True))
    assert champions == [1]
    assert verbs().count("model.promoted") == 3


def test_a_worse_candidate_waits_and_rollback_restores_the_champion(
    source, fresh: list[Item], monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = services.model_train(source=source, actor=None)
    # A crippled candidate: so regularised it predicts the majority class for everyone.
    family = get_family("logreg")
    real_params = family.params
    monkeypatch.setattr(family, "params", lambda *, seed: {**real_params(seed=seed), "C": 1e-6})
    v2 = services.model_train(source=source, actor=None)
    comparison = v2.metrics["promotion"]["comparison"]
    assert comparison["candidate_macro_f1"] < comparison["champion_macro_f1"]
    assert not v2.is_champion and "waits for an ML engineer" in v2.metrics["promotion"]["reason"]
    # The waiting candidate runs in shadow: it scores the item too, but v1's prediction routes it.
    assert v2.is_shadow and v2.metrics["promotion"]["shadow"] is True
    assert services.items_score(item_ids=[fresh[0].pk])["shadow_scored"] == 1
    # Forced promotion, then rollback: new items are scored (and routed) by v1 again.
    services.model_promote(model_version=v2, actor=None)
    services.items_score(item_ids=[fresh[1].pk])
    services.model_promote(model_version=v1, actor=None)
    services.items_score(item_ids=[fresh[2].pk])
    routed_by = dict(Item.objects.filter(pk__in=[i.pk for i in fresh[:3]])
                     .values_list("pk", "prediction__model_version_id"))
    assert routed_by == {fresh[0].pk: v1.pk, fresh[1].pk: v2.pk, fresh[2].pk: v1.pk}
    # Shadow predictions exist only beside the champion's, for the item scored while v2 was a shadow.
    made = sorted(Prediction.objects.values_list("item_id", "model_version_id"))
    assert made == sorted([(fresh[0].pk, v1.pk), (fresh[0].pk, v2.pk), (fresh[1].pk, v2.pk), (fresh[2].pk, v1.pk)])
    v2.refresh_from_db()
    assert not v2.is_shadow  # promotion ended its shadow run


def test_only_ready_versions_can_be_promoted(source) -> None:
    mv = ModelVersion.objects.create(source=source, version=9, algorithm="logreg", status=ModelVersion.Status.FAILED)
    with pytest.raises(Conflict, match="only a ready version"):
        services.model_promote(model_version=mv, actor=None)


def test_promotion_decision_rules() -> None:
    champion = ModelVersion(version=4)
    better = {"candidate_macro_f1": 0.80, "champion_macro_f1": 0.78, "n": 100}
    worse = {"candidate_macro_f1": 0.70, "champion_macro_f1": 0.78, "n": 100}
    decide = services._promotion_decision
    assert decide(promote=None, champion=None, comparison=None)[0] is True
    assert decide(promote=None, champion=champion, comparison=better)[0] is True
    promoted, why = decide(promote=None, champion=champion, comparison=worse)
    assert promoted is False and "below champion v4" in why and "waits for an ML engineer" in why
    assert decide(promote=True, champion=champion, comparison=worse)[0] is True
    assert decide(promote=False, champion=None, comparison=None)[0] is False
    assert decide(promote=None, champion=champion, comparison={"error": "boom", "n": 1})[0] is False


def test_items_score_writes_one_prediction_per_item_and_is_idempotent(source, fresh: list[Item]) -> None:
    mv = services.model_train(source=source, actor=None)
    ids = [i.pk for i in fresh]
    result = services.items_score(item_ids=ids + ids[:10])  # duplicates in a message change nothing
    assert result["scored"] == 150 and result["skipped"] == 0
    assert Prediction.objects.filter(item_id__in=ids).count() == 150
    items = list(Item.objects.filter(pk__in=ids).select_related("prediction"))
    assert all(i.state in ROUTED for i in items)
    assert all(i.prediction is not None and i.prediction.model_version_id == mv.pk for i in items)
    p = items[0].prediction
    assert set(p.probabilities) == set(payments.LABELS) and abs(sum(p.probabilities.values()) - 1) < 1e-5
    assert p.confidence == p.probabilities[p.top_label]
    # Explanations are computed for the items a person will look at (queued), not for auto-decided ones.
    queued = [i for i in items if i.state == Item.State.QUEUED]
    auto = [i for i in items if i.state == Item.State.AUTO_DECIDED]
    assert queued and auto and result["explained"] == len(queued)
    assert all(i.prediction.explanation["method"] == "linear" for i in queued)
    assert all(i.prediction.explanation is None for i in auto)
    assert verbs().count("items.scored") == 1

    again = services.items_score(item_ids=ids)
    assert again["scored"] == 0 and again["skipped"] == 150
    assert Prediction.objects.filter(item_id__in=ids).count() == 150
    assert verbs().count("items.scored") == 1


def test_an_item_scored_again_is_routed_by_its_stored_prediction_in_one_write(source, fresh: list[Item]) -> None:
    """An item back in ``received`` that already has a prediction by the champion keeps that prediction (one per
    item and version): the merged write points the item at the stored row and routes by what it says."""
    from reviewapp.review.models import Decision

    mv = services.model_train(source=source, actor=None)
    earlier = Prediction.objects.create(
        item=fresh[0], model_version=mv, probabilities={label: 0.0 for label in payments.LABELS},
        top_label=payments.LABELS[-1], confidence=0.999, alternatives=[], prediction_set=[],
        created_at=timezone.now(),
    )
    ids = [i.pk for i in fresh]
    result = services.items_score(item_ids=ids)
    assert result["scored"] == 150
    assert Prediction.objects.filter(item_id__in=ids, model_version=mv).count() == 150
    items = {i.pk: i for i in Item.objects.filter(pk__in=ids)}
    # No item is left half-way: each has its prediction and its route, in one state after scoring.
    assert all(i.state in (Item.State.AUTO_DECIDED, Item.State.QUEUED) and i.prediction_id for i in items.values())
    assert all(i.prediction_id == Prediction.objects.get(item_id=pk, model_version=mv).pk for pk, i in items.items())
    first = items[fresh[0].pk]
    assert first.prediction_id == earlier.pk
    for decision in Decision.objects.filter(item_id__in=ids):
        assert decision.prediction_id == items[decision.item_id].prediction_id
    if first.state == Item.State.AUTO_DECIDED:
        assert Decision.objects.get(item=first, is_current=True).label == earlier.top_label


def test_without_a_champion_every_item_goes_to_review(source, fresh: list[Item]) -> None:
    ids = [i.pk for i in fresh]
    result = services.items_score(item_ids=ids)
    assert result["unscored"] == 150 and result["scored"] == 0
    assert not Prediction.objects.exists()
    states = set(Item.objects.filter(pk__in=ids).values_list("state", flat=True))
    assert states == {Item.State.QUEUED}
    assert Item.objects.get(pk=ids[0]).route_reason == services.NO_MODEL_REASON


def _poisoned_predict(monkeypatch: pytest.MonkeyPatch, *, poison: float | None) -> None:
    """Make the model raise on any batch holding a row with amount == ``poison`` (None: on every batch)."""
    real = services.predict

    def predict(model, frame, label_set, **kwargs):  # type: ignore[no-untyped-def]
        if poison is None or (frame["amount"] == poison).any():
            raise RuntimeError("model exploded")
        return real(model, frame, label_set, **kwargs)

    monkeypatch.setattr(services, "predict", predict)


def test_a_poison_row_fails_alone(source, fresh: list[Item], monkeypatch: pytest.MonkeyPatch, settings) -> None:
    services.model_train(source=source, actor=None)
    bad = fresh[7]
    bad.payload = {**bad.payload, "amount": -1.0}
    bad.save(update_fields=["payload"])
    _poisoned_predict(monkeypatch, poison=-1.0)
    result = services.items_score(item_ids=[i.pk for i in fresh])
    assert result["scored"] == 149 and result["attempt_failed"] == 1 and result["failed"] == 0
    bad.refresh_from_db()
    assert bad.state == Item.State.RECEIVED and bad.attempts == 1 and "model exploded" in bad.last_error
    assert not Prediction.objects.filter(item=bad).exists()
    # At the attempt limit the item is failed, with the reason, never dropped.
    Item.objects.filter(pk=bad.pk).update(attempts=settings.MAX_TASK_ATTEMPTS - 1)
    services.items_score(item_ids=[bad.pk])
    bad.refresh_from_db()
    assert bad.state == Item.State.FAILED and bad.attempts == settings.MAX_TASK_ATTEMPTS
    assert bad.last_error.startswith(f"scoring failed after {settings.MAX_TASK_ATTEMPTS} attempts")
    assert "items.scoring_failed" in verbs()


def test_a_model_that_always_raises_fails_items_after_the_limit(
    source, fresh: list[Item], monkeypatch: pytest.MonkeyPatch, settings
) -> None:
    services.model_train(source=source, actor=None)
    _poisoned_predict(monkeypatch, poison=None)
    ids = [i.pk for i in fresh[:20]]
    for _ in range(settings.MAX_TASK_ATTEMPTS):
        services.items_score(item_ids=ids)
    states = set(Item.objects.filter(pk__in=ids).values_list("state", flat=True))
    assert states == {Item.State.FAILED}
    assert not Prediction.objects.exists()


def test_unloadable_champion_counts_as_a_failed_attempt(source, fresh: list[Item]) -> None:
    mv = services.model_train(source=source, actor=None)
    artifact_path(mv.artifact_sha256).write_bytes(b"tampered")
    result = services.items_score(item_ids=[fresh[0].pk])
    assert result["attempt_failed"] == 1
    fresh[0].refresh_from_db()
    assert "does not match" in fresh[0].last_error and fresh[0].state == Item.State.RECEIVED


def test_new_champion_is_used_without_restarting(source, fresh: list[Item]) -> None:
    v1 = services.model_train(source=source, actor=None)
    services.items_score(item_ids=[fresh[0].pk])
    v2 = services.model_train(source=source, actor=None, algorithm="hgb", promote=True)
    services.items_score(item_ids=[fresh[1].pk])
    got = dict(Prediction.objects.values_list("item_id", "model_version_id"))
    assert got == {fresh[0].pk: v1.pk, fresh[1].pk: v2.pk}


def test_reconcile_requeues_stuck_items_with_backoff_and_fails_after_the_limit(
    source, fresh: list[Item], settings, django_capture_on_commit_callbacks
) -> None:
    now = timezone.now()
    stuck, patient, hopeless, young = fresh[:3], fresh[3], fresh[4], fresh[5]
    Item.objects.filter(pk__in=[i.pk for i in stuck]).update(state_changed_at=now - timedelta(seconds=200))
    # Second retry waits 4x the base deadline (120 s): 300 s is not yet long enough.
    Item.objects.filter(pk=patient.pk).update(attempts=2, state_changed_at=now - timedelta(seconds=300))
    Item.objects.filter(pk=hopeless.pk).update(attempts=settings.MAX_TASK_ATTEMPTS - 1,
                                               state_changed_at=now - timedelta(days=1))
    settings.SCORING_CHUNK_SIZE = 2
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.items_reconcile() == 3
    assert len(callbacks) == 2  # three ids in chunks of two
    rows = dict(Item.objects.filter(pk__in=[i.pk for i in fresh[:6]]).values_list("pk", "attempts"))
    assert [rows[i.pk] for i in stuck] == [1, 1, 1] and rows[patient.pk] == 2 and rows[young.pk] == 0
    hopeless.refresh_from_db()
    assert hopeless.state == Item.State.FAILED
    assert hopeless.last_error.startswith(f"scoring did not complete after {settings.MAX_TASK_ATTEMPTS} attempts")
    # The deadline restarted: an immediate second pass finds nothing.
    assert services.items_reconcile() == 0


def test_stuck_training_versions_are_sent_again_or_failed(source, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(services, "_send", lambda name, kwargs: sent.append((name, kwargs)) or True)
    long_ago = timezone.now() - timedelta(hours=2)
    never_started = ModelVersion.objects.create(source=source, version=1, algorithm="logreg",
                                                created_at=timezone.now() - timedelta(minutes=5))
    died = ModelVersion.objects.create(source=source, version=2, algorithm="logreg", created_at=long_ago,
                                       params={services.STARTED_KEY: long_ago.isoformat()})
    running = ModelVersion.objects.create(source=source, version=3, algorithm="logreg", created_at=long_ago,
                                          params={services.STARTED_KEY: timezone.now().isoformat()})
    young = ModelVersion.objects.create(source=source, version=4, algorithm="logreg")
    assert services.models_reconcile() == {"requeued": 1, "failed": 1}
    assert sent == [(services.TRAIN_TASK, {"model_version_id": never_started.pk})]
    statuses = dict(ModelVersion.objects.values_list("pk", "status"))
    assert statuses == {never_started.pk: "training", died.pk: "failed", running.pk: "training", young.pk: "training"}
    died.refresh_from_db()
    assert "did not complete" in died.error


def test_training_task_body_marks_the_start_and_trains(source) -> None:
    mv = ModelVersion.objects.create(source=source, version=1, algorithm="logreg")
    done = services.model_train_version(model_version_id=mv.pk)
    assert done.status == "ready" and done.is_champion and services.STARTED_KEY not in done.params
    assert services.model_train_version(model_version_id=mv.pk).trained_at == done.trained_at  # idempotent
    assert services.model_train_version(model_version_id=123456789) is None


def test_a_network_champion_scores_explains_and_has_a_card(source, fresh: list[Item], client: Any,
                                                            ml_engineer: Any) -> None:
    mv = services.model_train(source=source, actor=None, algorithm="torch_mlp")
    assert mv.status == "ready" and mv.is_champion, mv.error
    assert mv.params["calibration"]["method"] == "temperature" and mv.metrics["roc_auc"] > 0.8
    result = services.items_score(item_ids=[i.pk for i in fresh])
    assert result["scored"] == 150 and result["explained"] > 0
    queued = Item.objects.filter(pk__in=[i.pk for i in fresh], state=Item.State.QUEUED).select_related("prediction")
    explanation = queued[0].prediction.explanation
    assert explanation["method"] == "integrated_gradients" and explanation["features"]
    client.force_login(ml_engineer)
    html = client.get(f"/models/{mv.pk}/").content.decode()
    assert "Multilayer perceptron" in html and "Temperature scaling (T = " in html
    assert 'id="risk-control"' in html and "Selective risk control" in html


@pytest.mark.parametrize("algorithm", ["logreg", "torch_mlp"])
def test_stored_predictions_are_the_json_of_what_the_model_said(source, fresh: list[Item], algorithm: str) -> None:
    """The staging COPY writes JSON texts built by joining pieces (``_PredictionJson``), not ``json.dumps``: for a
    scikit-learn and a torch champion, the texts are byte for byte ``json.dumps``'s, and the stored rows hold
    exactly the model's numbers (the same chunk predicted again in the same order)."""
    import json

    from django.db import connection

    from scoring.features import frame_from_payloads
    from scoring.inference import predict

    mv = services.model_train(source=source, actor=None, algorithm=algorithm)
    assert mv.is_champion, mv.error
    ids = sorted(i.pk for i in fresh)
    assert services.items_score(item_ids=ids)["scored"] == len(ids)
    model = services._cached_model(mv)
    payloads = dict(Item.objects.filter(pk__in=ids).values_list("pk", "payload"))
    rows = predict(model, frame_from_payloads([payloads[pk] for pk in ids], model.spec), list(source.labels))
    texts = services._PredictionJson()
    expected = []
    for row in rows:
        staged = texts(row)
        assert staged == (json.dumps(row.probabilities), row.top_label, row.confidence, json.dumps(row.alternatives),
                          json.dumps(row.prediction_set))
        expected.append(staged)
    stored = {p.item_id: p for p in Prediction.objects.filter(item_id__in=ids, model_version=mv)}
    for pk, row in zip(ids, rows, strict=True):
        p = stored[pk]
        assert (p.probabilities, p.top_label, p.confidence, p.alternatives, p.prediction_set) == (
            row.probabilities, row.top_label, row.confidence, row.alternatives, row.prediction_set)
    if connection.vendor != "postgresql":
        return  # the staging texts are PostgreSQL's path; SQLite stores through the ORM
    # And in the database: the stored jsonb is the jsonb of json.dumps's text.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM scoring_prediction AS p JOIN unnest(%s::bigint[], %s::text[], %s::text[], %s::text[])"
            " AS e(item_id, probabilities, alternatives, members) ON e.item_id = p.item_id"
            " WHERE p.model_version_id = %s AND p.probabilities = e.probabilities::jsonb"
            " AND p.alternatives = e.alternatives::jsonb AND p.prediction_set = e.members::jsonb",
            [ids, [e[0] for e in expected], [e[3] for e in expected], [e[4] for e in expected], mv.pk],
        )
        assert cursor.fetchone()[0] == len(ids)


def test_prediction_json_texts_match_json_dumps_on_odd_values() -> None:
    """Labels with quotes, backslashes, non-ASCII and line separators; floats at the edges; what json.dumps
    spells differently from repr (NaN, Infinity) or not at all as floats (ints, bools) falls back to it."""
    import json

    from scoring.inference import PredictionRow

    labels = ["legit", 'say "hi"', "back\\slash", "naïve", "\u2028sep", "%s", ""]
    values = [0.1 + 0.2, 1e-05, 5e-324, 0.0, 1.0, 1, True, float("nan"), float("inf"), 2 / 3]
    texts = services._PredictionJson()
    for shift in range(len(values)):
        vals = [values[(k + shift) % len(values)] for k in range(len(labels))]
        for members in ([], labels[:1], labels[:3]):
            alternatives = [[lab, v] for lab, v in zip(labels[1:], vals[1:], strict=True)]
            row = PredictionRow(probabilities=dict(zip(labels, vals, strict=True)), top_label=labels[0],
                                confidence=0.5, alternatives=alternatives, prediction_set=members)
            assert texts(row) == (json.dumps(row.probabilities), row.top_label, row.confidence,
                                  json.dumps(row.alternatives), json.dumps(row.prediction_set))
    empty = PredictionRow(probabilities={}, top_label="", confidence=0.0, alternatives=[], prediction_set=[])
    assert texts(empty) == ("{}", "", 0.0, "[]", "[]")


def test_the_warm_up_freezes_what_it_loaded_out_of_the_collectors_reach() -> None:
    import gc

    from scoring import tasks

    try:
        tasks._gc_freeze()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_received_items_are_read_and_locked_by_id_array(source, fresh: list[Item]) -> None:
    """The raw ``id = ANY(array)`` reads: only ``received`` items of the ids, by id, payloads parsed as the ORM
    would; an empty answer for ids that are gone or no longer waiting."""
    from django.db import transaction

    from reviewapp.ingest.pgcopy import id_array

    assert id_array([3, 1, 2]) == "{3,1,2}" and id_array([]) == "{}"
    ids = sorted(i.pk for i in fresh)
    Item.objects.filter(pk=ids[1]).update(state=Item.State.QUEUED)
    wanted = [ids[2], ids[0], ids[1], 987654321]
    items = services._items_read_received(wanted)
    assert [i.pk for i in items] == [ids[0], ids[2]]
    orm = dict(Item.objects.filter(pk__in=[ids[0], ids[2]]).values_list("pk", "payload"))
    assert all(i.payload == orm[i.pk] and i.source_id == source.pk for i in items)
    with transaction.atomic():
        assert services._items_lock_received(wanted) == [ids[0], ids[2]]
    assert services._items_read_received([987654321]) == []


def test_explanations_are_written_with_the_predictions_and_onto_an_earlier_one(source, fresh: list[Item]) -> None:
    """Queued items' explanations go into the inserted prediction rows (one version per row); an item whose
    earlier prediction by the champion wins and which is queued gets its explanation written onto that row."""
    from reviewapp.review.models import ReviewTask

    mv = services.model_train(source=source, actor=None)
    earlier = Prediction.objects.create(
        item=fresh[0], model_version=mv, probabilities={label: 0.5 for label in payments.LABELS},
        top_label=payments.LABELS[-1], confidence=0.001, alternatives=[], prediction_set=[],
        created_at=timezone.now(),
    )
    ids = [i.pk for i in fresh]
    updates_before = _prediction_updates_in_transaction()
    result = services.items_score(item_ids=ids)
    items = list(Item.objects.filter(pk__in=ids).select_related("prediction"))
    open_tasks = set(ReviewTask.objects.filter(item_id__in=ids, state=ReviewTask.State.OPEN)
                     .values_list("item_id", flat=True))
    first = next(i for i in items if i.pk == fresh[0].pk)
    assert first.prediction_id == earlier.pk and first.state == Item.State.QUEUED and first.pk in open_tasks
    assert first.prediction.explanation is not None and first.prediction.explanation["method"] == "linear"
    assert all((i.prediction.explanation is not None) == (i.pk in open_tasks) for i in items)
    assert result["explained"] == len(open_tasks) > 1
    # Each new prediction row was written once: the only UPDATE is the explanation onto the earlier row.
    if updates_before is not None:
        assert _prediction_updates_in_transaction() - updates_before == 1


def _prediction_updates_in_transaction() -> int | None:
    from django.db import connection

    if connection.vendor != "postgresql":
        return None  # SQLite keeps the ORM path (predictions, then explanations written onto them)
    with connection.cursor() as cursor:
        cursor.execute("SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'scoring_prediction'")
        return int(cursor.fetchone()[0])
