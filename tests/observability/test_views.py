"""Dashboard, drift and alerts pages: access, the htmx partial, charts and bounded queries."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from reviewapp.core.models import AuditEvent
from reviewapp.observability import services
from reviewapp.observability.models import AlertRule
from tests.factories import UserFactory
from tests.observability.helpers import build_sequence

pytestmark = pytest.mark.django_db


def test_dashboard_access(client, analyst, ml_engineer):
    client.force_login(analyst)
    assert client.get("/dashboard/").status_code == 403
    client.force_login(ml_engineer)
    assert client.get("/dashboard/").status_code == 403
    client.logout()
    assert client.get("/dashboard/").status_code == 302


def test_dashboard_renders_charts_health_and_polls(client, admin_user, django_assert_max_num_queries):
    build_sequence(now=timezone.now())
    client.force_login(admin_user)
    with django_assert_max_num_queries(70):
        response = client.get("/dashboard/")
    assert response.status_code == 200
    body = response.content.decode()
    assert body.count("<svg class=\"chart") >= 10
    assert 'data-health="needs attention"' in body
    assert "1 item(s) failed" in body and "dead-lettered" in body
    assert 'hx-trigger="every 30s"' in body and 'hx-get="/dashboard/?range=24h"' in body
    assert "<script" not in body.split("</head>", 1)[1]  # no inline script in the page body


def test_dashboard_partial_for_htmx_and_range_and_source(client, admin_user):
    seq = build_sequence(now=timezone.now())
    client.force_login(admin_user)
    response = client.get("/dashboard/?range=7d&source=obs", HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert response.status_code == 200 and not body.lstrip().startswith("<!doctype")
    assert body.lstrip().startswith('<div id="dashboard"')
    assert 'hx-get="/dashboard/?range=7d&amp;source=obs"' in body
    assert 'aria-current="true">7d<' in body and "buckets of one 6 hours" in body
    assert f'data-source="{seq.source.slug}"' in body
    # An unknown range falls back to 24h; an unknown source to all sources.
    fallback = client.get("/dashboard/?range=1y&source=nope", HTTP_HX_REQUEST="true").content.decode()
    assert "buckets of one hour" in fallback and "All sources" in fallback


def test_dashboard_healthy_when_nothing_is_wrong(client, admin_user):
    client.force_login(admin_user)
    body = client.get("/dashboard/").content.decode()
    assert 'data-health="healthy"' in body and "No data in this range" in body


def test_untrusted_names_are_escaped_in_charts():
    from reviewapp.observability import charts

    svg = str(charts.hbar_chart(title="t", categories=['<script>alert(1)</script>'], values=[0.5]))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    line = str(charts.line_chart(title="<b>", labels=["a", "b"], series=[charts.Series("<i>", [1, None])]))
    assert "<b>" not in line and "<i>" not in line


def test_drift_page_and_compute_button(client, admin_user, ml_engineer, analyst):
    seq = build_sequence(now=timezone.now())
    services.drift_compute(source_id=seq.source.pk)
    client.force_login(ml_engineer)
    body = client.get("/dashboard/drift/?source=obs").content.decode()
    assert "Drift and data quality" in body and "not computed" in body  # 8 items < the minimum
    response = client.post("/dashboard/drift/compute/", {"source": "obs", "window_days": "3"})
    assert response.status_code == 302 and response["Location"] == "/dashboard/drift/?source=obs"
    bad = client.post("/dashboard/drift/compute/", {"source": "obs", "window_days": "0"})
    assert bad.status_code == 302
    client.force_login(analyst)
    assert client.get("/dashboard/drift/").status_code == 403


def test_alerts_page_edit_is_audited(client, admin_user):
    build_sequence(now=timezone.now())
    client.force_login(admin_user)
    body = client.get("/dashboard/alerts/").content.decode()
    assert re.search(r'data-rule="failure-rate">.*?badge firing', body, re.S)
    rule = AlertRule.objects.get(name="failure-rate")
    response = client.post(f"/dashboard/alerts/{rule.pk}/", {
        f"r{rule.pk}-threshold": "0.5", f"r{rule.pk}-window_hours": "48", f"r{rule.pk}-enabled": "on"})
    assert response.status_code == 302
    rule.refresh_from_db()
    assert (rule.threshold, rule.window_hours, rule.enabled) == (0.5, 48, True)
    event = AuditEvent.objects.get(verb="alert_rule.updated")
    assert event.before["threshold"] == 0.02 and event.after["threshold"] == 0.5
    assert not next(s for s in services.alerts_evaluate() if s.rule.name == "failure-rate").firing
    viewer = UserFactory(role="admin")
    viewer.groups.clear()
    client.force_login(viewer)
    assert client.post(f"/dashboard/alerts/{rule.pk}/", {}).status_code == 403


def test_periodic_tasks_run_their_services():
    from reviewapp.observability.tasks import compute_drift, evaluate_alerts

    seq = build_sequence(now=timezone.now() - timedelta(minutes=1))
    result = evaluate_alerts.run()
    assert result["firing"] >= 2 and result["fired"] >= 2
    out = compute_drift.run(source_id=seq.source.pk)
    assert len(out["reports"]) == 1


def test_commands(capsys):
    from django.core.management import CommandError, call_command

    seq = build_sequence(now=timezone.now())
    call_command("compute_drift", seq.source.slug, "--days", "3")
    assert "obs: insufficient_data" in capsys.readouterr().out
    with pytest.raises(CommandError, match="failure-rate"):
        call_command("check_alerts", "--record")
    assert "FIRING failure-rate" in capsys.readouterr().out
    assert AlertRule.objects.get(name="failure-rate").firing
    with pytest.raises(CommandError, match="No source"):
        call_command("compute_drift", "nope")
