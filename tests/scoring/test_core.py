"""The pure ML core on the demo payments generator: features, training, calibration, inference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reviewapp.demo import payments
from scoring.calibration import (
    conformal_evaluate,
    conformal_qhat,
    conformal_scores,
    conformal_sets,
    expected_calibration_error,
    reliability_bins,
    temperature_fit,
    temperature_proba,
)
from scoring.estimators import algorithm_names, get_family
from scoring.features import (
    _fast_part,
    build_hashed_preprocessor,
    build_preprocessor,
    feature_spec_from_schema,
    frame_from_payloads,
    spec_columns,
)
from scoring.features import transform as fast_transform
from scoring.inference import predict, predict_proba_labels
from scoring.training import crossfit_evidence, evaluate_on, heldout_evidence, train

LABELS = list(payments.LABELS)


def payments_spec() -> dict:
    return feature_spec_from_schema(
        payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
        text_fields=payments.TEXT_FIELDS,
    )


@pytest.fixture(scope="module")
def data() -> tuple:
    df = payments.generate_payments(3000, seed=11)
    spec = payments_spec()
    frame = frame_from_payloads(df.drop(columns=[payments.LABEL_FIELD]).to_dict(orient="records"), spec)
    return df, spec, frame, df[payments.LABEL_FIELD].tolist()


@pytest.fixture(scope="module")
def logreg(data: tuple):
    _, spec, frame, labels = data
    return train(frame, labels, LABELS, spec, algorithm="logreg", seed=0)


def test_feature_spec_classifies_the_schema() -> None:
    spec = payments_spec()
    assert spec["numeric"] == ["amount", "hour", "account_age_days", "txn_count_24h"]
    assert [c["name"] for c in spec["categorical"]] == ["currency", "merchant_category", "country"]
    assert spec["categorical"][0]["enum"] == ["USD", "GBP", "EUR"]
    assert spec["boolean"] == ["card_present"]
    assert spec["text"] == ["description"]
    # Neither the id nor the label ever becomes a feature.
    assert payments.ID_FIELD not in spec_columns(spec) and payments.LABEL_FIELD not in spec_columns(spec)


def test_feature_spec_other_types() -> None:
    schema = {"properties": {
        "id": {"type": "string"}, "when": {"type": "string", "format": "date-time"},
        "code": {"type": "string", "maxLength": 10}, "blob": {"type": "string", "maxLength": 5000},
        "tags": {"type": "array"}, "score": {"type": ["number", "null"]}, "note": {"type": "string"},
    }}
    spec = feature_spec_from_schema(schema, id_field="id", text_fields=["note"])
    assert spec["datetime"] == ["when"]
    assert spec["numeric"] == ["score"]
    assert [c["name"] for c in spec["categorical"]] == ["code"]
    assert spec["text"] == ["note"]
    assert {i["name"] for i in spec["ignored"]} == {"blob", "tags"}
    frame = frame_from_payloads([{"when": "2024-03-05T23:10:00Z", "score": None}, {"when": "garbage"}], spec)
    assert frame.loc[0, "when__hour"] == 23 and frame.loc[0, "when__month"] == 3
    assert math.isnan(frame.loc[1, "when__hour"]) and math.isnan(frame.loc[0, "score"])


def test_frame_has_stable_columns_and_tolerates_bad_values() -> None:
    spec = payments_spec()
    frame = frame_from_payloads(
        [{"amount": "12.5", "card_present": True, "extra": 1, "description": "gift card"},
         {"amount": "not a number", "hour": 1e400, "card_present": "no", "country": None},
         {}],
        spec,
    )
    assert list(frame.columns) == spec_columns(spec)
    assert frame.loc[0, "amount"] == 12.5 and math.isnan(frame.loc[1, "amount"]) and math.isnan(frame.loc[1, "hour"])
    assert frame["card_present"].tolist()[:2] == [1.0, 0.0] and math.isnan(frame.loc[2, "card_present"])
    assert frame.loc[1, "country"] == "" and frame.loc[2, "description"] == ""
    assert list(frame_from_payloads([], spec).columns) == spec_columns(spec)
    # The preprocessor fits and transforms such a frame without complaint.
    build_preprocessor(spec).fit_transform(frame)


def test_logreg_quality_and_calibration(logreg, data: tuple) -> None:
    m = logreg.metrics
    assert m["split"] == {"order": "time (input order)", "training": 1800, "calibration": 600, "test": 600}
    assert m["roc_auc"] > 0.85, m["roc_auc"]
    assert m["accuracy"] >= m["majority_baseline_accuracy"]
    assert m["ece"] < 0.03, m["ece"]
    # Far better than the constant prior (the log loss a model that knows nothing would get).
    prior = m["per_label"]["fraud"]["support"] / m["n"]
    prior_loss = -(prior * math.log(prior) + (1 - prior) * math.log(1 - prior))
    assert m["log_loss"] < 0.75 * prior_loss
    assert m["per_label"]["fraud"]["f1"] > 0.3 and m["macro_f1"] > 0.6
    assert sum(b["count"] for b in m["reliability"]) == m["n"] and len(m["reliability"]) == 10
    conformal = m["conformal"]
    assert abs(conformal["coverage"] - 0.9) < 0.05, conformal
    _, _, frame, _ = data
    proba = predict_proba_labels(logreg, frame, LABELS)
    assert np.allclose(proba.sum(axis=1), 1.0) and (proba >= 0).all() and (proba <= 1).all()


def test_predict_rows(logreg, data: tuple) -> None:
    _, _, frame, _ = data
    rows = predict(logreg, frame.iloc[:200], LABELS, explain=True)
    assert len(rows) == 200
    for row in rows:
        assert list(row.probabilities) == LABELS
        assert abs(sum(row.probabilities.values()) - 1) < 1e-5
        assert row.confidence == max(row.probabilities.values()) == row.probabilities[row.top_label]
        assert [a[0] for a in row.alternatives] == [x for x in LABELS if x != row.top_label]
        probs = [row.confidence] + [p for _, p in row.alternatives]
        assert probs == sorted(probs, reverse=True)
        assert set(row.prediction_set) <= set(LABELS)
        assert row.explanation["method"] == "linear" and row.explanation["target"] == row.top_label
        assert row.explanation["features"]
    assert any(r.top_label == "fraud" for r in predict(logreg, frame, LABELS))


def test_linear_explanations_are_exact(logreg, data: tuple) -> None:
    """Field contributions plus the base add up to the uncalibrated log-odds of the explained class."""
    _, _, frame, _ = data
    part = frame.iloc[:50]
    fitted = logreg.pipeline
    target = np.ones(len(part), dtype=int)  # class index 1 of classes_
    explained = get_family("logreg").explain(logreg, part, logreg.transform(part), target, top_k=100)
    logit = fitted.decision_function(part)
    sign = 1 if list(fitted.classes_)[1] == explained[0]["target"] else -1
    for row, z in zip(explained, logit, strict=True):
        total = row["base"] + sum(v for _, v in row["features"])
        assert total == pytest.approx(sign * z, abs=2e-3)  # values are rounded to 4 places


def test_hgb_family(data: tuple) -> None:
    _, spec, frame, labels = data
    model = train(frame, labels, LABELS, spec, algorithm="hgb", seed=0)
    assert model.metrics["roc_auc"] > 0.82 and model.metrics["ece"] < 0.04
    rows = predict(model, frame.iloc[:20], LABELS, explain=True)
    assert rows[0].explanation["method"] == "occlusion"
    # Occlusion on the feature matrix equals blanking the field in the payload and building features again.
    part = frame.iloc[:20].reset_index(drop=True)
    target = np.ones(len(part), dtype=int)
    fast = get_family("hgb").explain(model, part, model.transform(part), target, top_k=100)
    base = model.predict_proba(part)[:, 1]
    for field in ("amount", "country", "description", "card_present"):
        blanked = part.assign(**{field: "" if part[field].dtype == object else np.nan})
        drop = base - model.predict_proba(blanked)[:, 1]
        got = [dict(row["features"]).get(field, 0.0) for row in fast]
        assert got == pytest.approx(np.round(drop, 4), abs=1e-4)


def test_multiclass_and_unseen_label(data: tuple) -> None:
    df, spec, frame, labels = data
    three = [("fraud" if lab == "fraud" else ("large" if a > 60 else "legit")) for lab, a in zip(labels, df.amount,
                                                                                                 strict=True)]
    label_set = ["legit", "large", "fraud", "never_seen"]
    model = train(frame, three, label_set, spec, algorithm="logreg")
    proba = predict_proba_labels(model, frame, label_set)
    assert proba.shape == (len(frame), 4)
    assert np.allclose(proba.sum(axis=1), 1.0) and (proba[:, 3] == 0).all()
    assert model.metrics["per_label"]["large"]["f1"] > 0.8
    rows = predict(model, frame.iloc[:5], label_set, explain=True)
    assert rows[0].probabilities["never_seen"] == 0.0


def test_champion_style_evaluation_on_other_rows(logreg, data: tuple) -> None:
    df = payments.generate_payments(600, seed=99)
    spec = logreg.spec
    frame = frame_from_payloads(df.to_dict(orient="records"), spec)
    metrics = evaluate_on(logreg, frame, df[payments.LABEL_FIELD].tolist(), LABELS)
    assert metrics["n"] == 600 and metrics["roc_auc"] > 0.8


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["legit"] * 30 + ["fraud"] * 10, "not enough labels"),
        (["legit"] * 200, "2 classes"),
        (["legit"] * 197 + ["fraud"] * 3, "2 classes"),
        # Every fraud label sits in the oldest part: the held-out parts would have a single class.
        (["fraud"] * 20 + ["legit"] * 180, "single class"),
        (["legit"] * 190 + ["spam"] * 10, "outside the label set"),
    ],
)
def test_training_refuses_labels_that_cannot_support_a_model(labels: list[str], message: str, data: tuple) -> None:
    _, spec, frame, _ = data
    with pytest.raises(ValueError, match=message):
        train(frame.iloc[: len(labels)], labels, LABELS, spec)


def test_unknown_algorithm(data: tuple) -> None:
    _, spec, frame, labels = data
    assert set(algorithm_names()) >= {"logreg", "hgb"}
    with pytest.raises(ValueError, match="unknown algorithm"):
        train(frame, labels, LABELS, spec, algorithm="magic")


def test_calibration_measures() -> None:
    y = np.array([0, 0, 1, 1])
    perfect = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, y) == 0.0
    overconfident = np.array([[0.95, 0.05]] * 4)  # always says class 0 at 0.95, right half the time
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.45)
    bins = reliability_bins(overconfident, y)
    assert bins[9]["count"] == 4 and bins[9]["accuracy"] == 0.5 and bins[0]["count"] == 0


def test_conformal_quantile_and_sets() -> None:
    proba = np.array([[0.9, 0.1]] * 9 + [[0.4, 0.6]])
    y = np.zeros(10, dtype=int)  # scores: nine 0.1 and one 0.6
    assert conformal_qhat(proba, y, alpha=0.2) == pytest.approx(0.1)
    # ceil(11 * 0.95) = 11 > 10 rows: not enough evidence for that level, so every label is kept.
    assert conformal_qhat(proba, y, alpha=0.05) == 1.0
    sets = conformal_sets(np.array([[0.92, 0.08], [0.5, 0.5]]), 0.1)
    assert sets.tolist() == [[True, False], [False, False]]


def test_datetime_parts_are_scaled_numeric_features() -> None:
    schema = {"properties": {"id": {"type": "string"}, "when": {"type": "string", "format": "date-time"}}}
    spec = feature_spec_from_schema(schema, id_field="id")
    frame = frame_from_payloads([{"when": f"2024-0{m}-0{d}T{h:02d}:00:00Z"} for m, d, h in
                                 [(1, 1, 0), (2, 3, 12), (3, 5, 23), (4, 7, 6)]], spec)
    pre = build_preprocessor(spec).fit(frame)
    assert list(pre.get_feature_names_out()) == ["num__when__hour", "num__when__dayofweek", "num__when__month"]
    assert frame["when__dayofweek"].tolist() == [0.0, 5.0, 1.0, 6.0]  # Monday is 0
    assert frame["when__hour"].tolist() == [0.0, 12.0, 23.0, 6.0] and frame["when__month"].tolist() == [1, 2, 3, 4]


def test_aps_sets_cover_and_contain_the_lac_idea() -> None:
    proba = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33]])
    # APS: the shortest top-ranked prefix whose mass reaches qhat.
    assert conformal_sets(proba, 0.75, method="aps").tolist() == [
        [True, True, False], [True, True, False], [True, True, True]]
    # Tied labels are ranked together (both in or both out): deterministic and conservative.
    assert conformal_sets(proba, 0.5, method="aps").tolist() == [
        [True, False, False], [True, False, False], [True, True, True]]
    y = np.array([1, 0, 2])
    # Score of the true label: mass ranked strictly above it, plus its own (a tie is not "above").
    assert conformal_scores(proba, y, method="aps") == pytest.approx([0.9, 0.5, 0.67])
    with pytest.raises(ValueError, match="unknown conformal method"):
        conformal_sets(proba, 0.5, method="raps")


def test_lac_and_aps_coverage_on_held_out_rows(logreg, data: tuple) -> None:
    fresh = payments.generate_payments(3000, seed=12)
    proba = predict_proba_labels(logreg, frame_from_payloads(fresh.to_dict(orient="records"), logreg.spec), LABELS)
    y = np.array([LABELS.index(v) for v in fresh[payments.LABEL_FIELD]])
    lac = conformal_evaluate(proba, y, alpha=0.1, method="lac")
    aps = conformal_evaluate(proba, y, alpha=0.1, method="aps")
    # Cross-fitted LAC coverage on 3,000 rows: within 0.03 of the target (sd ~0.006 from the evaluated half,
    # ~0.008 from the half that set the quantile; 0.03 is over 3 combined sd).
    assert abs(lac["coverage"] - 0.9) < 0.03, lac
    # Non-randomised APS never returns an empty set, so it over-covers when the top label alone is right more
    # often than 1 - alpha (here ~97%): valid, but conservative. LAC is the default for that reason.
    assert aps["method"] == "aps" and aps["coverage"] >= 0.9 - 0.03 and aps["mean_set_size"] >= lac["mean_set_size"]


def test_conformal_level_and_method_are_configurable(data: tuple) -> None:
    _, spec, frame, labels = data
    model = train(frame, labels, LABELS, spec, alpha=0.2, conformal_method="aps")
    assert model.conformal["method"] == "aps" and model.conformal["alpha"] == 0.2
    assert model.metrics["conformal"]["target_coverage"] == pytest.approx(0.8)
    assert model.metrics["conformal"]["coverage"] >= 0.8 - 0.06
    rows = predict(model, frame.iloc[:50], LABELS)
    assert all(r.prediction_set and r.prediction_set[0] == r.top_label for r in rows if r.prediction_set)
    with pytest.raises(ValueError, match="unknown conformal method"):
        train(frame, labels, LABELS, spec, conformal_method="magic")


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 3))
    # Labels drawn from softmax(logits / 2): the logits are twice as confident as they should be.
    p = temperature_proba(logits, 2.0)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert temperature_fit(logits, y) == pytest.approx(2.0, rel=0.1)


def test_heldout_evidence_is_the_test_part_only(logreg, data: tuple) -> None:
    _, _, _, labels = data
    evidence = heldout_evidence(logreg, labels, LABELS)
    assert len(evidence["confidence"]) == 600 == len(logreg.test_index)  # the newest 20%, never training rows
    assert logreg.test_index[0] == 2400
    assert evidence["correct"].dtype == bool and set(evidence["top_label"].tolist()) <= {0, 1}
    assert evidence["label_set"].tolist() == LABELS
    accuracy = logreg.metrics["accuracy"]
    assert evidence["correct"].mean() == pytest.approx(accuracy)


@pytest.mark.parametrize("kind", ["sparse", "dense", "hashed"])
def test_fast_transform_equals_the_column_transformer(kind: str, data: tuple) -> None:
    _, spec, frame, _ = data
    # A free (non-enum) category too, for the infrequent-category encoder.
    spec = {**spec, "categorical": [{**c, "enum": None} if c["name"] == "country" else c for c in spec["categorical"]]}
    pre = {"sparse": lambda: build_preprocessor(spec), "dense": lambda: build_preprocessor(spec, dense=True),
           "hashed": lambda: build_hashed_preprocessor(spec)}[kind]().fit(frame.iloc[:1000])
    for part in (frame.iloc[1000:1500], frame.iloc[[7]], frame_from_payloads([{"amount": "oops"}], spec)):
        fast, slow = fast_transform(pre, part), pre.transform(part)
        assert type(fast) is type(slow) and fast.shape == slow.shape
        assert abs(fast - slow).max() == 0


@pytest.mark.parametrize("kind", ["sparse", "dense", "hashed"])
def test_fast_transformers_match_scikit_learn_on_awkward_rows(kind: str, data: tuple) -> None:
    """The fitted imputers, scalers and one-hot encoders are applied from their fitted attributes (no per-call
    validation); the output must be the very same arrays: same floats, same sparse structure, same dtype."""
    _, spec, frame, _ = data
    train_frame = frame.iloc[:1000].copy()
    train_frame["txn_count_24h"] = np.nan  # an empty column at fit time: kept, imputed with 0
    pre = {"sparse": lambda: build_preprocessor(spec), "dense": lambda: build_preprocessor(spec, dense=True),
           "hashed": lambda: build_hashed_preprocessor(spec)}[kind]().fit(train_frame)
    awkward = frame_from_payloads([
        {"amount": None, "currency": "XXX", "country": None, "card_present": "yes", "description": ""},
        {"amount": "12.5", "hour": 1e400, "merchant_category": 3, "card_present": None},
        {},
        {"amount": 10, "currency": "usd", "card_present": False, "description": "gift card refund"},
    ], spec)
    for name, transformer, columns in pre.transformers_:
        if not name.startswith(("hash_", "text_")) and name != "remainder":
            assert _fast_part(transformer, awkward, columns) is not None, name  # the fast path, not a fallback
    for part in (awkward, awkward.iloc[[2]], frame.iloc[1500:1510], frame.iloc[[3]]):
        fast, slow = fast_transform(pre, part), pre.transform(part)
        assert type(fast) is type(slow) and fast.dtype == slow.dtype and fast.shape == slow.shape
        if hasattr(slow, "indices"):
            for attr in ("indptr", "indices", "data"):
                assert np.array_equal(getattr(fast, attr), getattr(slow, attr)), attr
        else:
            assert np.array_equal(fast, slow)


def test_crossfit_scores_every_label_with_a_model_that_never_saw_it(data: tuple) -> None:
    _, spec, frame, labels = data
    evidence, record = crossfit_evidence(frame, labels, LABELS, spec, folds=4, algorithm="logreg", seed=0)
    assert len(evidence["confidence"]) == 3000 and evidence["fold"].tolist() == sorted(evidence["fold"].tolist())
    assert [f["heldout_rows"] for f in record["per_fold"]] == [[0, 749], [750, 1499], [1500, 2249], [2250, 2999]]
    assert all(f["n_trained"] == 2250 for f in record["per_fold"])
    # Fold 2's scores are exactly those of the same training procedure run on the other three blocks.
    rest = list(range(0, 750)) + list(range(1500, 3000))
    model = train(frame.iloc[rest].reset_index(drop=True), [labels[i] for i in rest], LABELS, spec, seed=0)
    proba = predict_proba_labels(model, frame.iloc[750:1500].reset_index(drop=True), LABELS)
    assert np.array_equal(evidence["confidence"][750:1500], proba.max(axis=1))
    y = np.array([LABELS.index(lab) for lab in labels])
    assert np.array_equal(evidence["correct"], evidence["top_label"] == y)
    assert evidence["correct"].mean() > 0.9


def test_crossfit_refuses_folds_that_cannot_be_trained(data: tuple) -> None:
    _, spec, frame, labels = data
    with pytest.raises(ValueError, match=r"fold 1 of 5 .*cannot be trained: not enough labels"):
        crossfit_evidence(frame.iloc[:60], labels[:60], LABELS, spec, folds=5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        crossfit_evidence(frame, labels, LABELS, spec, folds=1)
