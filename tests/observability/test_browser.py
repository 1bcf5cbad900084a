"""The dashboard in headless Chromium: charts drawn as inline SVG, the health summary in words, the time
range and source pickers swapping the partial through htmx, no dialogs and no CSP errors."""

from __future__ import annotations

from django.utils import timezone
from playwright.sync_api import expect

from tests.e2e.conftest import login
from tests.factories import PASSWORD, UserFactory
from tests.observability.helpers import build_sequence


def test_dashboard_in_the_browser(live_server, page, transactional_db):
    seq = build_sequence(now=timezone.now())
    build_sequence(now=timezone.now(), slug="second")
    admin = UserFactory(username="dash-admin", role="admin")
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    login(page, live_server, admin.username, PASSWORD)
    page.goto(f"{live_server.url}/dashboard/")
    dashboard = page.locator("#dashboard")
    expect(dashboard).to_be_visible()
    expect(page.locator("#health .verdict")).to_have_text("needs attention")
    expect(page.locator("#health .reasons")).to_contain_text("failed")
    charts = page.locator("#dashboard svg.chart")
    assert charts.count() >= 11  # ten pipeline charts and the per-source comparison
    # Charts are drawn: lines for throughput, the human review band, bars for the problems chart.
    assert page.locator("svg.throughput polyline.series").count() >= 1
    assert page.locator("svg.shares rect.band").count() == 1
    assert page.locator("svg.problems rect.b").count() >= 1
    box = page.locator("svg.throughput").bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100

    before = dashboard.get_attribute("data-updated")
    page.get_by_role("link", name="7d", exact=True).click()
    expect(page.locator('.range-picker a[aria-current="true"]')).to_have_text("7d")
    expect(page).to_have_url(f"{live_server.url}/dashboard/?range=7d")
    assert page.locator("#dashboard").get_attribute("data-updated") != before
    assert page.evaluate("document.querySelectorAll('#dashboard').length") == 1  # swapped, not nested

    page.select_option("#dash-source", seq.source.slug)
    expect(page.locator("#health h2")).to_contain_text(seq.source.slug)
    expect(page).to_have_url(f"{live_server.url}/dashboard/?range=7d&source={seq.source.slug}")
    assert page.locator('tr[data-source="second"]').count() == 0
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors
