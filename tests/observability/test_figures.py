"""Pipeline figures against a known event sequence: selectors, the dashboard series and /metrics."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from reviewapp.observability import selectors, services
from tests.observability.helpers import EXPECTED, build_sequence

pytestmark = pytest.mark.django_db


def _figures(seq, **kw):
    return selectors.source_figures(start=seq.now - timedelta(hours=24), end=seq.now + timedelta(seconds=1),
                                    now=seq.now, **kw)[seq.source.pk]


def test_source_figures_match_the_sequence():
    seq = build_sequence(now=timezone.now())
    f = _figures(seq)
    for name, expected in EXPECTED.items():
        actual = getattr(f, name)
        if isinstance(expected, tuple):
            assert actual == pytest.approx(expected, abs=1e-6), name
        else:
            assert actual == pytest.approx(expected, abs=1e-9), name
    # Reliability bins behind the ECE.
    assert [(b["bin"], b["n"]) for b in f.reliability] == [(5, 1), (6, 1), (7, 1), (9, 2)]


def test_windows_cut_by_their_own_timestamps():
    seq = build_sequence(now=timezone.now())
    # The last hour holds only i7 and i8: received, scored, nothing decided, no verdicts.
    f = selectors.source_figures(start=seq.now - timedelta(hours=1), end=seq.now + timedelta(seconds=1),
                                 now=seq.now)[seq.source.pk]
    assert (f.received, f.scored, f.auto_decided, f.reviewed, f.review_routed) == (2, 2, 0, 0, 2)
    assert f.lag_scored == pytest.approx((120.0, 129.0))
    assert f.lag_decided == (None, None) and f.handling_p50_seconds is None
    # Current state does not depend on the window.
    assert (f.queue_depth, f.failed_now, f.dead_actions_now) == (2, 1, 1)
    assert f.failed_in_window == 0


def test_overall_figures_add_sources_up():
    now = timezone.now()
    a = build_sequence(now=now, slug="obs-a")
    build_sequence(now=now, slug="obs-b")
    figs = selectors.source_figures(start=now - timedelta(hours=24), end=now + timedelta(seconds=1), now=now)
    total = selectors.overall_figures(figs.values(), start=now - timedelta(hours=24), end=now + timedelta(seconds=1))
    assert total.received == 16 and total.overrides == 2 and total.queue_depth == 4
    assert total.accuracy_vs_qa == pytest.approx(0.5) and total.ece == pytest.approx(0.474)
    # Each lag twice: the p95 rank 0.95 * 13 = 12.35 falls between the two 130 s values.
    assert total.lag_scored == pytest.approx((70.0, 130.0))
    assert figs[a.source.pk].received == 8


def test_query_count_does_not_grow_with_sources():
    now = timezone.now()
    build_sequence(now=now, slug="q1")
    window = {"start": now - timedelta(hours=24), "end": now + timedelta(seconds=1), "now": now}
    with CaptureQueriesContext(connection) as one:
        selectors.source_figures(**window)
    build_sequence(now=now, slug="q2")
    build_sequence(now=now, slug="q3")
    with CaptureQueriesContext(connection) as three:
        selectors.source_figures(**window)
    assert len(three) == len(one) <= 16


def test_dashboard_series_buckets():
    seq = build_sequence(now=timezone.now())
    frame = selectors.time_frame(key="24h", now=seq.now)
    assert frame.buckets == 24 and frame.start <= seq.base < frame.end
    series = selectors.dashboard_series(frame=frame, now=seq.now, source_id=seq.source.pk)
    base_bucket = int((seq.base - frame.start).total_seconds() // 3600)
    assert sum(series["received"]) == 8 and series["received"][base_bucket] == 6
    assert sum(series["scored"]) == 7 and sum(series["auto_decided"]) == 2 and sum(series["reviewed"]) == 7
    assert sum(series["overrides"]) == 1 and sum(series["failed"]) == 1 and sum(series["dead_actions"]) == 1
    # Now: the two open tasks wait; before base nothing waited.
    assert series["queue_depth"][-1] == 2 and series["queue_depth"][0] == 0
    assert series["oldest_wait"][-1] == pytest.approx(EXPECTED["oldest_wait_seconds"])
    # Every percentile bucket holds real values or None, never zeros for "no data".
    assert all(v is None for v in series["lag_decided_p95"][:base_bucket])
    assert len(series["human_share"]) == 24


def test_health_summary_names_the_problems():
    seq = build_sequence(now=timezone.now())
    f = _figures(seq)
    statuses = services.alerts_evaluate(now=seq.now)
    health = services.health_summary(figures=f, statuses=statuses, source_id=seq.source.pk)
    assert not health.healthy
    text = " ".join(health.reasons)
    assert "failed" in text and "dead-lettered" in text
    assert any("QA reviewers on 50%" in n for n in health.notes)


def _metrics(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    out = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_text_matches_the_sequence(client):
    build_sequence(now=timezone.now())
    m = _metrics(client)
    src = ("source", "obs")

    def value(name, **labels):
        return m[(name, tuple(sorted({**dict([src]), **labels}.items())))]

    assert value("reviewapp_items_received_total") == 8
    assert value("reviewapp_predictions_total") == 7
    assert value("reviewapp_decisions_total", origin="model") == 2
    assert value("reviewapp_decisions_total", origin="reviewer") == 4
    assert value("reviewapp_overrides_total") == 1
    assert value("reviewapp_verdicts_total") == 7
    assert value("reviewapp_queue_depth") == 2
    assert value("reviewapp_queue_oldest_age_seconds") == pytest.approx(EXPECTED["oldest_wait_seconds"], abs=30)
    assert value("reviewapp_failed_items") == 1 and value("reviewapp_dead_lettered_actions") == 1
    assert value("reviewapp_automation_share") == pytest.approx(2 / 7)
    assert value("reviewapp_human_review_share") == pytest.approx(1.0)
    assert value("reviewapp_reviewer_agreement") == pytest.approx(0.5)
    assert value("reviewapp_model_accuracy", against="qa") == pytest.approx(0.5)
    assert value("reviewapp_model_accuracy", against="reviewers") == pytest.approx(1 / 3)
    assert value("reviewapp_calibration_error") == pytest.approx(0.474)
    assert value("reviewapp_handling_time_median_seconds") == pytest.approx(30.0)
    # Lag quantiles over the last hour: i7 (110 s) and i8 (130 s).
    assert value("reviewapp_pipeline_lag_seconds", stage="scored", quantile="0.5") == pytest.approx(120.0)
    assert value("reviewapp_pipeline_lag_seconds", stage="scored", quantile="0.95") == pytest.approx(129.0)
    # Handling histogram over [10, 15, 20, 30, 40, 50, 60] s.
    assert value("reviewapp_handling_time_seconds_bucket", le="5.0") == 0
    assert value("reviewapp_handling_time_seconds_bucket", le="10.0") == 1
    assert value("reviewapp_handling_time_seconds_bucket", le="30.0") == 4
    assert value("reviewapp_handling_time_seconds_bucket", le="60.0") == 7
    assert value("reviewapp_handling_time_seconds_bucket", le="+Inf") == 7
    assert value("reviewapp_handling_time_seconds_count") == 7
    assert value("reviewapp_handling_time_seconds_sum") == pytest.approx(225.0)
    assert value("reviewapp_action_runs", kind="log", state="dead") == 1
    # Alerts: 1 of 8 items failed (past 2%), one dead-lettered run; the queue is young.
    assert m[("reviewapp_alert_firing", (("rule", "failure-rate"),))] == 1
    assert m[("reviewapp_alert_firing", (("rule", "dead-actions"),))] == 1
    assert m[("reviewapp_alert_firing", (("rule", "queue-age"),))] == 0
    assert m[("reviewapp_alert_value", (("rule", "failure-rate"),))] == pytest.approx(1 / 8)
    # Labels stay bounded: no item ids anywhere.
    assert not any(k == "item" or k == "item_id" for _n, labels in m for k, _v in labels)


def test_alert_rules_per_source_and_thresholds():
    seq = build_sequence(now=timezone.now())
    from reviewapp.observability.models import AlertRule

    rule = AlertRule.objects.create(name="obs-queue", metric="queue_age_seconds", source=seq.source, threshold=60)
    quiet = AlertRule.objects.create(name="obs-queue-lenient", metric="queue_age_seconds", threshold=10_000)
    statuses = {s.rule.name: s for s in services.alerts_evaluate(now=seq.now, rules=[rule, quiet])}
    assert statuses["obs-queue"].firing and statuses["obs-queue"].value == pytest.approx(2890.0)
    assert "obs" in statuses["obs-queue"].detail
    assert not statuses["obs-queue-lenient"].firing
    changed = services.alerts_record(statuses=list(statuses.values()), now=seq.now)
    assert changed == {"fired": 1, "resolved": 0}
    rule.refresh_from_db()
    assert rule.firing and rule.firing_since == seq.now
    from reviewapp.core.models import AuditEvent

    assert AuditEvent.objects.filter(verb="alert.fired", object_id=str(rule.pk)).count() == 1
    # The same state again changes nothing in the trail.
    services.alerts_record(statuses=list(statuses.values()), now=seq.now)
    assert AuditEvent.objects.filter(verb="alert.fired", object_id=str(rule.pk)).count() == 1


def test_promise_breach_from_qa_samples_against_target_error():
    """A target_error policy promises at most 5% error among auto-decisions; QA samples are the evidence.
    The alert fires only when the one-sided lower confidence bound of the QA error is above the promise."""
    from reviewapp.review.models import Label, Policy
    from scoring.models import ModelVersion, Prediction
    from tests.factories import make_payments_source
    from tests.observability.helpers import ensure_default_rules

    ensure_default_rules()
    now = timezone.now()
    outcomes = {}
    for slug, wrong in (("broken", 6), ("kept", 1)):
        source = make_payments_source(slug=slug)
        Policy.objects.create(source=source, version=2, mode="target_error", target_error=0.05, confidence=0.95)
        model = ModelVersion.objects.create(source=source, version=1, algorithm="t", status="ready")
        for i in range(30):
            item = source.items.create(external_id=f"{slug}-{i}", payload={}, payload_sha256="0" * 64,
                                       schema_version=source.schema_versions.first(), state="auto_decided")
            item.prediction = Prediction.objects.create(item=item, model_version=model, probabilities={},
                                                        top_label="legit", confidence=0.99)
            item.save(update_fields=["prediction"])
            Label.objects.create(item=item, source=source, origin="qa", label="fraud" if i < wrong else "legit",
                                 created_at=now - timedelta(days=1))
        outcomes[slug] = source.pk
    status = next(s for s in services.alerts_evaluate(now=now) if s.rule.name == "promise-breach")
    assert status.firing and list(status.breaching) == [outcomes["broken"]]
    # 6 errors in 30: Clopper-Pearson 95% lower bound 0.0909 > 0.05; 1 in 30: 0.0017.
    assert status.breaching[outcomes["broken"]] == pytest.approx(0.0909 - 0.05, abs=1e-4)
    assert "broken" in status.detail and "kept" not in status.detail
