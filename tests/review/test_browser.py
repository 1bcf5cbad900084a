"""Work mode in headless chromium: the keyboard flow of review.js (keys, idempotency key, handling
time, skip, help) and that a hostile payload stays inert."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from reviewapp.review.models import ReviewTask, Verdict
from tests.e2e.conftest import login
from tests.factories import PASSWORD, make_payments_source
from tests.review.helpers import make_batch, make_scored_items, payment

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_keyboard_flow(live_server, analyst, page, transactional_db):
    source = make_payments_source(thresholds={"legit": 0.99})
    batch = make_batch(source, user=analyst, filename="june.csv")
    hostile = payment("evil-1", description='<script>alert("x")</script><img src=x onerror=alert(1)>' + " x" * 80)
    make_scored_items(source, [("fraud", 0.71), ("legit", 0.8), ("legit", 0.9), ("legit", 0.95)], batch=batch,
                      payloads=[hostile, payment("p-2"), payment("p-3"), payment("p-4")])
    login(page, live_server, analyst.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    item = page.locator("#review-item")
    expect(item).to_be_visible(timeout=15000)
    expect(page.locator("#confidence")).to_have_text("71.0%")
    expect(page.locator("#provenance")).to_contain_text("june.csv")
    first = item.get_attribute("data-item-id")
    expect(item).to_have_attribute("data-prepared", "1")  # review.js has set the item's own key
    key = page.locator("#review-item input[name=idempotency_key]").input_value()
    assert UUID.match(key)
    page.evaluate("window.__marker = 'same-page'")

    page.keyboard.press("2")  # the second label: fraud
    expect(item).not_to_have_attribute("data-item-id", first, timeout=10000)
    verdict = Verdict.objects.get(item_id=int(first))
    assert (verdict.label, verdict.idempotency_key) == ("fraud", key)
    assert verdict.handling_ms is not None and verdict.handling_ms >= 0
    assert page.locator("#review-item input[name=idempotency_key]").input_value() != key

    second = item.get_attribute("data-item-id")
    page.keyboard.press("Enter")  # accept the model's label
    expect(item).not_to_have_attribute("data-item-id", second, timeout=10000)
    assert Verdict.objects.get(item_id=int(second)).label == "legit"

    third = item.get_attribute("data-item-id")
    page.keyboard.press("s")
    expect(item).not_to_have_attribute("data-item-id", third, timeout=10000)
    assert ReviewTask.objects.get(item_id=int(third)).state == "open"

    page.keyboard.press("?")
    expect(page.locator("#keys-help")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#keys-help")).to_be_hidden()
    # Typing a note does not trigger shortcuts.
    page.locator("#verdict-note").fill("")
    page.locator("#verdict-note").type("1 s 2")
    assert Verdict.objects.count() == 2
    assert page.evaluate("window.__marker") == "same-page"
    assert page.dialogs == []  # type: ignore[attr-defined]
