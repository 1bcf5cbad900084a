"""The what-if simulator: exact answers on synthetic data with known probabilities, and honest evidence."""

from __future__ import annotations

import numpy as np
import pytest

from reviewapp.review.models import Label
from reviewapp.review.policy_simulation import (
    Evidence,
    auto_mask,
    curve_svg,
    histogram_svg,
    histograms,
    honest_evidence,
    policy_simulate,
    simulate,
    tradeoff_curve,
    wilson_interval,
)
from reviewapp.review.services import route_one
from tests.review.policy_helpers import add_labeled, block, make_champion, source_setup

LABELS = ["legit", "fraud"]


def _known() -> Evidence:
    """1,000 items: four confidence levels, each with exactly (1 - confidence) of its items wrong."""
    conf, top, true = [], [], []
    for level, n in ((0.6, 200), (0.8, 300), (0.95, 300), (0.99, 200)):
        wrong = round((1 - level) * n)
        for i in range(n):
            label = "legit" if i % 2 == 0 else "fraud"
            other = "fraud" if label == "legit" else "legit"
            conf.append(level)
            top.append(label)
            true.append(other if i < wrong else label)
    return Evidence.build(conf, top, true)


def test_shares_and_error_are_exact_on_known_probabilities() -> None:
    ev = _known()
    sim = simulate(thresholds={"legit": 0.9, "fraud": 0.9}, label_set=LABELS, evidence=ev)
    assert sim["auto_rate"] == pytest.approx(0.5)  # the 0.95 and 0.99 levels: 500 of 1,000
    assert sim["review_rate"] == pytest.approx(0.5)
    assert sim["n_labels"] == 500
    # (0.05 * 300 + 0.01 * 200) / 500 wrong among auto-decided items.
    assert sim["est_auto_error"] == pytest.approx(17 / 500)
    lo, hi = sim["est_auto_error_interval"]
    assert (lo, hi) == pytest.approx(wilson_interval(17, 500))
    assert lo < 17 / 500 < hi

    only_legit = simulate(thresholds={"legit": 0.7}, label_set=LABELS, evidence=ev)
    # legit is half of each level: above 0.7 that is (300 + 300 + 200) / 2 = 400 of 1,000.
    assert only_legit["auto_rate"] == pytest.approx(0.4)
    assert only_legit["per_label"]["fraud"]["auto_rate"] == 0.0
    assert only_legit["per_label"]["legit"]["auto_rate"] == pytest.approx(0.4)

    nothing = simulate(thresholds={}, label_set=LABELS, evidence=ev)
    assert nothing["auto_rate"] == 0.0 and nothing["review_rate"] == 1.0 and nothing["est_auto_error"] is None
    assert simulate(thresholds=None, label_set=LABELS, evidence=ev)["review_rate"] == 1.0


def test_qa_share_and_population_shares() -> None:
    ev = _known()
    pop_conf = np.array([0.5, 0.95, 0.99, 0.999])
    pop_top = np.array(["legit", "legit", "fraud", "fraud"])
    sim = simulate(thresholds={"legit": 0.9, "fraud": 0.995}, label_set=LABELS, evidence=ev,
                   population_confidences=pop_conf, population_top_labels=pop_top, qa_sample_rate=0.1)
    assert sim["shares_from"] == "recent_predictions"
    assert sim["auto_rate"] == pytest.approx(0.5)  # 0.95 legit and 0.999 fraud
    assert sim["qa_review_rate"] == pytest.approx(0.05)


def test_auto_mask_is_route_one() -> None:
    rng = np.random.default_rng(3)
    conf = np.round(rng.uniform(0.5, 1.0, 2000), 3)
    tops = rng.choice(np.array(LABELS), 2000)
    thresholds = {"legit": 0.9, "fraud": 0.975}
    mask = auto_mask(conf, tops, thresholds)
    expected = [route_one(label=t, confidence=float(c), thresholds=thresholds, why_none="").auto
                for c, t in zip(conf, tops, strict=True)]
    assert mask.tolist() == expected


def test_weights_count_qa_samples_by_their_inverse_rate() -> None:
    # 10 reviewed items in the band (all right) and 1 QA item above it (wrong) drawn at 10%: it stands for 10.
    ev = Evidence.build([0.9] * 10 + [0.99], ["legit"] * 11, ["legit"] * 10 + ["fraud"], [1.0] * 10 + [10.0])
    sim = simulate(thresholds={"legit": 0.85}, label_set=LABELS, evidence=ev)
    assert sim["est_auto_error"] == pytest.approx(10 / 20)
    assert sim["n_effective"] == pytest.approx(20 * 20 / (10 + 100), abs=0.01)


def test_warning_when_few_labels_in_the_auto_region() -> None:
    ev = Evidence.build([0.99] * 5, ["legit"] * 5, ["legit"] * 5)
    sim = simulate(thresholds={"legit": 0.9}, label_set=LABELS, evidence=ev)
    assert any("only 5 held-out labels" in w for w in sim["warnings"])


def test_wilson_interval_known_value() -> None:
    lo, hi = wilson_interval(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-4) and hi == pytest.approx(0.1744, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_curve_and_histograms_geometry() -> None:
    ev = _known()
    points = tradeoff_curve(label_set=LABELS, evidence=ev)
    reviews = [p["review_rate"] for p in points]
    assert reviews == sorted(reviews)  # higher shared threshold, more review
    svg = curve_svg(points, {"candidate": {"review_rate": 0.5, "est_auto_error": 0.034},
                             "current": {"review_rate": 1.0, "est_auto_error": None}})
    assert svg["path"].startswith("M") and svg["marks"]["candidate"] and svg["marks"]["current"] is None
    hist = histograms(label_set=LABELS, evidence=ev)
    assert sum(hist["per_label"]["legit"]["right"]) + sum(hist["per_label"]["legit"]["wrong"]) == \
        hist["per_label"]["legit"]["n"]
    charts = histogram_svg(hist, {"legit": 0.9})
    assert [c["label"] for c in charts] == LABELS and charts[0]["lines"][0]["label"] == "legit 0.9"


# --- Honest evidence from the database -----------------------------------------------------------------


@pytest.mark.django_db
def test_evidence_leaves_out_training_labels_and_weights_qa() -> None:
    source = source_setup(qa_sample_rate=0.25)
    model = make_champion(source, max_label_id=None)
    trained_on = add_labeled(source, block("legit", 0.99, 20, 0, "fraud"), model=model)
    max_id = Label.objects.filter(item__in=trained_on).order_by("-id").values_list("id", flat=True)[0]
    model = make_champion(source, max_label_id=max_id)
    add_labeled(source, block("legit", 0.97, 40, 4, "fraud"), model=model)
    qa_items = add_labeled(source, block("legit", 0.995, 8, 0, "fraud"), origin=Label.Origin.QA, model=model)
    policy = source.policies.get()
    from reviewapp.ingest.models import Item

    Item.objects.filter(pk__in=[i.pk for i in qa_items]).update(policy=policy)

    bundle = honest_evidence(source=source, champion=model)
    assert bundle.evidence.size == 48
    assert bundle.counts == {"test_split": 0, "post_training": 48, "qa": 8}
    assert sorted(set(bundle.evidence.weights.tolist())) == [1.0, 4.0]
    assert any("no label snapshot" in w for w in bundle.warnings)


@pytest.mark.django_db
def test_policy_simulate_end_to_end_numbers(admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    add_labeled(source, block("legit", 0.95, 100, 5, "fraud") + block("fraud", 0.8, 50, 10, "legit"), model=model)
    sim = policy_simulate(source=source, candidate={"mode": "threshold", "thresholds": {"legit": 0.9},
                                                    "qa_sample_rate": 0.0})
    assert sim["est_auto_error"] == pytest.approx(0.05)
    assert sim["n_labels"] == 100 and sim["evidence"]["post_training"] == 150
    assert sim["per_label"]["fraud"]["threshold"] is None
    assert sim["thresholds_from"] == "policy"
    # Target-error mode: thresholds from risk control on the same evidence (too few labels for 1%).
    target = policy_simulate(source=source, candidate={"mode": "target_error", "target_error": 0.01,
                                                       "confidence": 0.9, "qa_sample_rate": 0.0})
    assert target["thresholds_from"] == "computed" and target["thresholds"] == {}
    assert target["auto_rate"] == 0.0 and any("nothing is auto-decided" in w for w in target["warnings"])


@pytest.mark.django_db
@pytest.mark.parametrize("boundary", ["hash", "fit_until"])
def test_evidence_includes_the_champions_own_held_out_part(boundary) -> None:
    import hashlib

    from django.utils import timezone

    source = source_setup()
    model = make_champion(source, max_label_id=None)
    add_labeled(source, block("legit", 0.97, 100, 3, "fraud"), model=model)
    rows = list(Label.objects.filter(source=source).order_by("created_at", "id"))
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.item_id}\t{row.label}\n".encode())
    snapshot = {"count": 100, "max_label_id": rows[-1].pk, "sha256": digest.hexdigest()}
    if boundary == "fit_until":
        seen = rows[79]  # 60% fit + 20% calibration
        snapshot = {**snapshot, "sha256": "stale", "fit_until": [seen.created_at.isoformat(), seen.pk]}
    model.label_snapshot = snapshot
    model.trained_at = timezone.now()
    model.save()
    add_labeled(source, block("legit", 0.97, 5, 0, "fraud"), model=model)  # collected after training
    bundle = honest_evidence(source=source, champion=model)
    assert bundle.counts["test_split"] == 20 and bundle.counts["post_training"] == 5
    assert not bundle.warnings


@pytest.mark.django_db
def test_evidence_skips_a_changed_training_set() -> None:
    from django.utils import timezone

    source = source_setup()
    model = make_champion(source, max_label_id=None)
    items = add_labeled(source, block("legit", 0.97, 50, 0, "fraud"), model=model)
    model.label_snapshot = {"count": 50, "max_label_id": Label.objects.order_by("-id").first().pk, "sha256": "x"}
    model.trained_at = timezone.now()
    model.save()
    bundle = honest_evidence(source=source, champion=model)
    assert bundle.counts["test_split"] == 0 and bundle.evidence.size == 0
    assert any("changed since it trained" in w for w in bundle.warnings)
    assert len(items) == 50
