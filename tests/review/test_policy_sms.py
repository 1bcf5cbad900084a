"""Real data: the SMS Spam Collection. A target-error policy keeps its promise on messages the model never saw;
auto-deciding whenever the conformal set is a single label does not, where the model is weak."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from django.utils import timezone

from reviewapp.ingest.models import Item, SchemaVersion, Source
from reviewapp.review.models import Decision, Label, Policy
from reviewapp.review.policy_services import policy_update
from reviewapp.review.policy_simulation import evidence_cache_clear, policy_simulate
from reviewapp.review.services import items_route
from scoring.calibration import conformal_sets
from scoring.features import feature_spec_from_schema, frame_from_payloads
from scoring.inference import TrainedModel, predict_proba_labels
from scoring.models import ModelVersion, Prediction
from scoring.risk_control import choose_thresholds
from scoring.training import train

LABELS = ["ham", "spam"]
SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "text": {"type": "string"}},
          "required": ["id", "text"]}
SPEC = feature_spec_from_schema(SCHEMA, id_field="id", text_fields=["text"])
TARGET = 0.02
N_TRAIN, N_HELDOUT = 2500, 1500


def _messages(shared_data_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(shared_data_dir / "sms_spam.tsv", sep="\t", quoting=3)
    return df.sample(frac=1.0, random_state=7).reset_index(drop=True)


def _payloads(part: pd.DataFrame, mutate: Any = None) -> list[dict[str, str]]:
    return [{"id": f"m{i}", "text": mutate(t) if mutate else t} for i, t in zip(part.index, part["SMS"], strict=True)]


def _train(part: pd.DataFrame, mutate: Any = None) -> TrainedModel:
    frame = frame_from_payloads(_payloads(part, mutate), SPEC)
    return train(frame, list(part["Label"]), LABELS, SPEC, min_labels=50, min_per_class=5)


def _proba(model: TrainedModel, part: pd.DataFrame, mutate: Any = None) -> np.ndarray:
    return predict_proba_labels(model, frame_from_payloads(_payloads(part, mutate), SPEC), LABELS)


# --- Through the application: evidence, the policy service, the real router ------------------------------


def _items(source: Source, schema: SchemaVersion, part: pd.DataFrame, state: str) -> list[Item]:
    rows = []
    for payload in _payloads(part):
        raw = json.dumps(payload, sort_keys=True).encode()
        rows.append(Item(source=source, external_id=payload["id"], payload=payload, schema_version=schema,
                         payload_sha256=hashlib.sha256(raw).hexdigest(), state=state))
    return Item.objects.bulk_create(rows, batch_size=2000)


def _predictions(model_version: ModelVersion, items: list[Item], proba: np.ndarray) -> list[Prediction]:
    rows = []
    for item, p in zip(items, proba, strict=True):
        top = int(p.argmax())
        rows.append(Prediction(item=item, model_version=model_version, probabilities=dict(zip(LABELS, p.tolist(),
                                                                                             strict=True)),
                               top_label=LABELS[top], confidence=float(p[top]),
                               alternatives=[[LABELS[1 - top], float(p[1 - top])]], prediction_set=[LABELS[top]]))
    return Prediction.objects.bulk_create(rows, batch_size=2000)


def _labels(source: Source, items: list[Item], truth: list[str]) -> list[Label]:
    return Label.objects.bulk_create([Label(item=i, source=source, label=t, origin=Label.Origin.IMPORT)
                                      for i, t in zip(items, truth, strict=True)], batch_size=2000)


@pytest.mark.django_db
def test_target_error_policy_keeps_its_promise_on_unseen_messages(shared_data_dir, admin_user) -> None:
    df = _messages(shared_data_dir)
    trained, heldout, unseen = df.iloc[:N_TRAIN], df.iloc[N_TRAIN:N_TRAIN + N_HELDOUT], df.iloc[N_TRAIN + N_HELDOUT:]
    model = _train(trained)

    source = Source.objects.create(slug="sms", name="SMS", labels=LABELS, id_field="id", text_fields=["text"])
    schema = SchemaVersion.objects.create(source=source, major=1, minor=0, json_schema=SCHEMA)
    Policy.objects.create(source=source, version=1, thresholds={}, qa_sample_rate=0.0)
    # The training labels are in the ledger too (with the champion's overconfident predictions on them):
    # the evidence must leave them out.
    train_items = _items(source, schema, trained, Item.State.DECIDED)
    train_labels = _labels(source, train_items, list(trained["Label"]))
    champion = ModelVersion.objects.create(
        source=source, version=1, algorithm="logreg", status=ModelVersion.Status.READY, is_champion=True,
        trained_at=timezone.now(),
        label_snapshot={"count": len(train_labels), "max_label_id": max(lab.pk for lab in train_labels)},
    )
    _predictions(champion, train_items, _proba(model, trained))
    held_items = _items(source, schema, heldout, Item.State.DECIDED)
    _predictions(champion, held_items, _proba(model, heldout))
    _labels(source, held_items, list(heldout["Label"]))
    evidence_cache_clear()

    saved = policy_update(source=source, actor=admin_user, mode=Policy.Mode.TARGET_ERROR, target_error=TARGET,
                          confidence=0.95, qa_sample_rate=0.0, comment="2% promise")
    champion.refresh_from_db()
    rc = champion.risk_control
    assert saved.risk_control_stored and rc["target_error"] == TARGET and rc["thresholds"]
    assert rc["evidence"]["n_heldout"] == N_HELDOUT  # only labels it never trained on
    assert rc["evidence"]["basis"]["post_training"] == N_HELDOUT

    # New messages arrive, are scored by the champion and routed by the real router.
    new_items = _items(source, schema, unseen, Item.State.SCORED)
    for item, prediction in zip(new_items, _predictions(champion, new_items, _proba(model, unseen)), strict=True):
        item.prediction = prediction
    Item.objects.bulk_update(new_items, ["prediction"], batch_size=2000)
    items_route(item_ids=[i.pk for i in new_items])

    truth = dict(zip([i.pk for i in new_items], unseen["Label"], strict=True))
    auto = list(Decision.objects.filter(item_id__in=truth, origin=Decision.Origin.MODEL)
                .values_list("item_id", "label"))
    assert len(auto) > 0.5 * len(new_items)  # the model is good: most messages are decided alone
    measured = sum(label != truth[item_id] for item_id, label in auto) / len(auto)
    assert measured <= TARGET, f"measured auto-error {measured:.4f} above the promised {TARGET}"
    assert all(d.policy_id == saved.policy.pk for d in Decision.objects.filter(item_id__in=truth))

    # The what-if agrees: same thresholds (now the champion's stored ones) and an estimate within the promise.
    sim = policy_simulate(source=source, candidate={"mode": "target_error", "target_error": TARGET,
                                                    "confidence": 0.95, "qa_sample_rate": 0.0})
    assert sim["thresholds_from"] == "champion" and sim["thresholds"] == rc["thresholds"]
    assert sim["evidence"]["post_training"] == N_HELDOUT and sim["est_auto_error"] <= TARGET
    assert sim["auto_rate"] == pytest.approx(len(auto) / len(new_items), abs=0.03)  # shares from recent items


# --- A weak model: the singleton conformal set is not an error promise ----------------------------------


def _first_two_words(text: str) -> str:
    return " ".join(str(text).split()[:2])


@pytest.mark.parametrize(("n_train", "mutate", "naive_factor"), [
    (200, None, 1.5),  # few training labels
    (400, _first_two_words, 3.0),  # few labels and crippled features: only the first two words of each message
], ids=["few-labels", "two-words"])
def test_singleton_conformal_sets_break_the_promise_where_the_model_is_weak(
    shared_data_dir, n_train, mutate, naive_factor,
) -> None:
    df = _messages(shared_data_dir)
    trained, heldout = df.iloc[:n_train], df.iloc[n_train:n_train + N_HELDOUT]
    unseen = df.iloc[n_train + N_HELDOUT:]
    model = _train(trained, mutate)
    truth = np.array(unseen["Label"])

    p_held = _proba(model, heldout, mutate)
    top_held = np.array(LABELS)[p_held.argmax(1)]
    result = choose_thresholds(p_held.max(1), top_held == np.array(heldout["Label"]), top_held, label_set=LABELS,
                               target_error=TARGET, delta=0.05)

    p_new = _proba(model, unseen, mutate)
    top_new = np.array(LABELS)[p_new.argmax(1)]
    wrong = top_new != truth

    # Risk control: auto-decide only above the chosen thresholds (or nothing, and it says why).
    thresholds = np.array([result.thresholds.get(t, np.inf) for t in top_new])
    auto = p_new.max(1) >= thresholds
    if auto.any():
        assert wrong[auto].mean() <= TARGET
    else:
        assert result.reason and "nothing is auto-decided" in result.reason

    # The naive alternative: auto-decide whenever the conformal set (coverage 90%) holds a single label.
    singleton = conformal_sets(p_new, float(model.conformal["qhat"])).sum(axis=1) == 1
    assert singleton.mean() > 0.5  # it would auto-decide most messages...
    naive_error = wrong[singleton].mean()
    # ...at well above the target error, while the risk-controlled policy stays within it.
    assert naive_error > naive_factor * TARGET, f"singleton auto-error {naive_error:.3f}"
