"""An analyst works the queue in a real browser: log in, start reviewing, decide, get the next item."""

import os
import shutil
from pathlib import Path

from playwright.sync_api import expect

from reviewapp.demo import payments
from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision
from tests.e2e.conftest import login
from tests.factories import PASSWORD
from tests.loop_helpers import create_payments_source_via_api, upload_frame, wait_batch_done, wait_items_routed

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def test_analyst_reviews_from_the_keyboard(live_worker, live_server, admin_api, analyst, page, tmp_path):
    from django.core.management import call_command

    create_payments_source_via_api(admin_api)
    wait_batch_done(upload_frame(admin_api, "payments", payments.generate_payments(2000, seed=1), "h.csv")["id"])
    call_command("train", "payments", "--promote")
    incoming = payments.generate_payments(40, seed=2, start=5000).drop(columns=[payments.LABEL_FIELD])
    incoming.loc[0, "description"] = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    batch_id = upload_frame(admin_api, "payments", incoming, "incoming.csv")["id"]
    wait_batch_done(batch_id)
    wait_items_routed(batch_id, 40)
    assert Item.objects.filter(batch_id=batch_id, state="queued").count() >= 2

    login(page, live_server, analyst.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    item = page.locator("#review-item")
    expect(item).to_be_visible(timeout=15000)
    first_id = item.get_attribute("data-item-id")
    expect(page.locator("#predicted-label")).not_to_be_empty()
    expect(page.locator("#confidence")).to_contain_text("%")
    provenance = page.locator("#provenance")
    for word in ("payments", "incoming.csv", "policy", "v1"):
        expect(provenance).to_contain_text(word)

    shot = tmp_path / "review-screen.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS"):
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, DOCS_IMG / "review-screen.png")

    # Key 2 picks the second label ("fraud"); the next item swaps in without a page load.
    page.evaluate("window.__marker = 'same-page'")
    page.keyboard.press("2")
    expect(item).not_to_have_attribute("data-item-id", first_id, timeout=10000)
    assert page.evaluate("window.__marker") == "same-page"
    decision = Decision.objects.get(item_id=int(first_id), is_current=True)
    assert decision.label == "fraud" and decision.origin == "reviewer"
    assert decision.verdict.reviewer == analyst and decision.verdict.handling_ms is not None
    assert page.dialogs == []  # type: ignore[attr-defined]
