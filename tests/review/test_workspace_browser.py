"""Issue 5 in headless chromium: the whole keyboard flow (labels, Enter, undo, skip, escalate, help), two
reviewers claiming at once, a verdict whose response is lost, hostile content in every view, and the
layout (no jump between items, the verdict bar inside 1280x800)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, Route, expect

from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict
from tests.e2e.conftest import login
from tests.factories import PASSWORD, UserFactory, make_payments_source
from tests.review.helpers import make_batch, make_scored_items, payment

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SCRIPT = '<script>alert("x")</script>'
HANDLER = '"><img src=x onerror=alert(1)>'
JS_URL = "javascript:alert(1)"


@pytest.fixture
def second_page(browser: Browser) -> Iterator[Page]:
    """Another person's browser: its own context (cookies), the same dialog trap as ``page``."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs  # type: ignore[attr-defined]
    yield page
    context.close()


def _shown(page: Page) -> int:
    item = page.locator("#review-item")
    expect(item).to_be_visible(timeout=15000)
    # review.js has prepared it (fresh idempotency key, clock): reading the key before that races it.
    expect(item).to_have_attribute("data-prepared", "1")
    return int(item.get_attribute("data-item-id"))


def _next(page: Page, before: int) -> int:
    expect(page.locator("#review-item")).not_to_have_attribute("data-item-id", str(before), timeout=10000)
    return _shown(page)


def test_whole_keyboard_flow(live_server, analyst, page, transactional_db):
    source = make_payments_source(thresholds={"legit": 0.99})
    a, b, c, d, e = make_scored_items(source, [("fraud", 0.3), ("legit", 0.4), ("legit", 0.5), ("legit", 0.6),
                                               ("legit", 0.7)])
    login(page, live_server, analyst.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    assert _shown(page) == a.pk
    page.evaluate("window.__marker = 'same-page'")
    key = page.locator("#review-item input[name=idempotency_key]").input_value()
    assert UUID.match(key)
    assert page.evaluate("document.activeElement.id") == "review-item"  # keys work without a click

    page.keyboard.press("2")  # second label: fraud
    assert _next(page, a.pk) == b.pk
    verdict = Verdict.objects.get(item=a)
    assert (verdict.label, verdict.idempotency_key) == ("fraud", key) and verdict.handling_ms is not None
    expect(page.locator("#status-line")).to_contain_text("Recorded fraud")
    expect(page.locator("#sr-announce")).to_contain_text("Recorded fraud")  # said once, by one live region

    page.keyboard.press("Enter")  # the model's label
    assert _next(page, b.pk) == c.pk
    assert Verdict.objects.get(item=b).label == "legit"

    page.keyboard.press("u")  # undo the verdict on b: b comes back, c goes back to the queue
    assert _next(page, c.pk) == b.pk
    expect(page.locator("#status-line")).to_contain_text("withdrawn")
    withdrawn = Verdict.objects.get(item=b)
    assert withdrawn.withdrawn_at is not None
    assert not Label.objects.filter(item=b, is_active=True).exists()
    assert not Decision.objects.filter(item=b, is_current=True).exists()
    assert Item.objects.get(pk=b.pk).state == Item.State.IN_REVIEW
    assert ReviewTask.objects.get(item=c).state == "open"

    page.keyboard.press("1")  # answer b again
    assert _next(page, b.pk) == c.pk
    assert Verdict.objects.get(item=b, withdrawn_at__isnull=True).label == "legit"

    page.keyboard.press("s")
    assert _next(page, c.pk) == d.pk
    assert ReviewTask.objects.get(item=c).state == "open"

    # Keys are text while typing a note; Tab leaves the note, then E escalates with it.
    page.locator("#verdict-note").click()
    page.keyboard.type("card 1 looks cloned, s e u")
    assert Verdict.objects.filter(withdrawn_at__isnull=True).count() == 2
    page.keyboard.press("Tab")
    page.keyboard.press("e")
    assert _next(page, d.pk) == e.pk
    escalation = ReviewTask.objects.get(item=d, kind="escalation")
    assert escalation.note == "card 1 looks cloned, s e u" and escalation.state == "open"

    page.keyboard.press("?")
    expect(page.locator("#keys-help")).to_be_visible()
    expect(page.locator("#keys-help")).to_contain_text("undo your last verdict")
    page.keyboard.press("Escape")
    expect(page.locator("#keys-help")).to_be_hidden()
    assert page.evaluate("window.__marker") == "same-page"
    assert page.dialogs == []  # type: ignore[attr-defined]


def test_two_reviewers_claiming_at_once_get_different_items(live_server, page, second_page, transactional_db):
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5), ("legit", 0.6), ("legit", 0.7)])
    one, two = UserFactory(role="analyst"), UserFactory(role="analyst")
    login(page, live_server, one.username, PASSWORD)
    login(second_page, live_server, two.username, PASSWORD)
    # Both pages claim on load; start both before waiting for either.
    page.goto(f"{live_server.url}/review/", wait_until="commit")
    second_page.goto(f"{live_server.url}/review/", wait_until="commit")
    first_id, second_id = _shown(page), _shown(second_page)
    assert first_id != second_id
    claims = dict(ReviewTask.objects.filter(state="claimed").values_list("item_id", "claimed_by_id"))
    assert claims == {first_id: one.pk, second_id: two.pk}


def test_double_review_in_two_browsers_is_independent(live_server, page, second_page, transactional_db):
    source = make_payments_source(thresholds={})
    Policy.objects.filter(source=source).update(double_review_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.5)])
    one, two = UserFactory(role="analyst"), UserFactory(role="analyst")
    login(page, live_server, one.username, PASSWORD)
    login(second_page, live_server, two.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    second_page.goto(f"{live_server.url}/review/")
    assert _shown(page) == _shown(second_page) == item.pk  # the same item, two independent tasks
    page.locator("#verdict-note").fill("first opinion: stolen card")
    page.locator("#verdict-form button[data-label=fraud]").click()
    expect(page.locator("#review-empty")).to_be_visible(timeout=10000)  # the twin is not handed back to one
    second_page.reload()
    assert _shown(second_page) == item.pk
    expect(second_page.locator("#review-item")).not_to_contain_text("stolen card")
    second_page.locator("#history summary").click()
    expect(second_page.locator("#history")).to_contain_text("1 other answer", timeout=10000)
    expect(second_page.locator("#history")).not_to_contain_text("fraud")
    second_page.keyboard.press("1")  # legit: a disagreement
    expect(second_page.locator("#review-empty")).to_be_visible(timeout=10000)
    assert ReviewTask.objects.get(item=item, kind="adjudication").state == "open"
    assert page.dialogs == [] and second_page.dialogs == []  # type: ignore[attr-defined]


def test_a_verdict_whose_response_is_lost_is_retried_with_its_key_and_applied_once(
        live_server, analyst, page, transactional_db):
    source = make_payments_source(thresholds={})
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    lost: list[str] = []

    def drop_first_response(route: Route) -> None:
        if not lost:
            # The server gets the verdict and answers; the answer never reaches the browser.
            response = route.fetch()
            lost.append(str(response.status))
            route.abort("connectionreset")
        else:
            route.continue_()

    login(page, live_server, analyst.username, PASSWORD)
    page.route(re.compile(r".*/review/items/\d+/verdict/$"), drop_first_response)
    page.goto(f"{live_server.url}/review/")
    assert _shown(page) == first.pk
    key = page.locator("#review-item input[name=idempotency_key]").input_value()
    page.keyboard.press("2")
    expect(page.locator("#retry-status")).to_be_visible(timeout=5000)
    assert _next(page, first.pk) == second.pk
    assert lost == ["200"]
    (verdict,) = Verdict.objects.filter(item=first)
    assert verdict.idempotency_key == key and verdict.label == "fraud"
    expect(page.locator("#retry-status")).to_be_hidden()
    assert ReviewTask.objects.get(item=second).claimed_by == analyst


def test_hostile_content_stays_inert_in_every_view(live_server, page, second_page, transactional_db):
    source = make_payments_source(slug="evil", thresholds={})
    Source.objects.filter(pk=source.pk).update(labels=["legit", SCRIPT, HANDLER, JS_URL])
    source.refresh_from_db()
    hostile = payment("e-1", description=SCRIPT + HANDLER + " " + JS_URL, merchant_category=HANDLER,
                      country=JS_URL)
    long_hostile = payment("e-2", description=(SCRIPT + HANDLER) * 10)
    first, second, third = make_scored_items(
        source, [(SCRIPT, 0.4), (HANDLER, 0.5), (JS_URL, 0.6)], payloads=[hostile, long_hostile, payment("e-3")],
        batch=make_batch(source, filename=HANDLER + ".csv"))
    first.prediction.explanation = {"method": "linear", "target": SCRIPT, "features": [[HANDLER, 1.0]],
                                    "tokens": [["description:script", 0.5], [f"description:{HANDLER}", -0.2]]}
    first.prediction.save(update_fields=["explanation"])
    analyst, admin = UserFactory(role="analyst", username="ana"), UserFactory(role="admin", username="adm")
    login(page, live_server, analyst.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    assert _shown(page) == first.pk
    page.locator(".raw-json summary").click()
    page.locator("#verdict-note").fill(SCRIPT + HANDLER + JS_URL)
    page.locator("#verdict-note").press("Tab")
    page.keyboard.press("3")  # the HANDLER label
    assert _next(page, first.pk) == second.pk
    page.locator(".payload details summary").first.click()
    page.locator("#verdict-note").fill(HANDLER)
    page.locator("#verdict-note").press("Tab")
    page.keyboard.press("e")
    _next(page, second.pk)
    page.keyboard.press("Enter")  # JS_URL is the model's label of the third item
    expect(page.locator("#review-empty")).to_be_visible(timeout=10000)
    for path in ("/queue/?kind=all", f"/review/items/{first.pk}/", f"/review/items/{second.pk}/",
                 "/review/stats/"):
        page.goto(f"{live_server.url}{path}")
        page.wait_for_load_state("networkidle")
        page.locator("details").evaluate_all("els => els.forEach(e => e.open = true)")
    login(second_page, live_server, admin.username, PASSWORD)
    second_page.goto(f"{live_server.url}/review/adjudication/")
    expect(second_page.locator("#admin-queue")).to_contain_text(HANDLER)
    second_page.goto(f"{live_server.url}/review/?queue=adjudication")
    expect(second_page.locator("#escalation-note")).to_have_text(HANDLER, timeout=10000)
    second_page.locator("details").evaluate_all("els => els.forEach(e => e.open = true)")
    second_page.goto(f"{live_server.url}/review/stats/")
    second_page.wait_for_load_state("networkidle")
    assert Verdict.objects.get(item=first).label == HANDLER and Verdict.objects.get(item=third).label == JS_URL
    assert page.dialogs == [] and second_page.dialogs == []  # type: ignore[attr-defined]
    assert page.evaluate("document.querySelectorAll('img').length") == 0


def test_layout_keeps_still_and_fits_1280x800(live_server, analyst, page, transactional_db):
    source = make_payments_source(thresholds={})
    short, long_ = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)],
                                     payloads=[payment("s-1"), payment("l-1", description="very long text " * 200)])
    login(page, live_server, analyst.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    assert _shown(page) == short.pk
    before = page.locator("#verdict-form").bounding_box()
    page.keyboard.press("1")
    assert _next(page, short.pk) == long_.pk
    after = page.locator("#verdict-form").bounding_box()
    assert abs(before["y"] - after["y"]) < 1 and abs(before["height"] - after["height"]) < 1
    assert after["y"] + after["height"] <= 800  # the verdict bar is on screen without scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    # Focus is visible on the controls a keyboard user reaches.
    page.keyboard.press("Tab")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") not in ("none", "")


def test_undo_says_which_actions_could_not_be_withdrawn(live_server, analyst, admin_user, page, transactional_db):
    """U after a verdict whose decision already acted: the page lists the action delivered (cannot be
    withdrawn, no compensation configured) and the one withdrawn before it was sent; names stay text."""
    from actions.models import ActionRun
    from actions.services import action_config_create, action_run_deliver
    from tests.conftest import wait_for

    source = make_payments_source(thresholds={})
    action_config_create(source=source, actor=admin_user, kind="log", name="record", label="fraud")
    action_config_create(source=source, actor=admin_user, kind="log", name=f"notify {HANDLER}", label="fraud",
                         high_risk=True)
    a, b = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    login(page, live_server, analyst.username, PASSWORD)
    page.goto(f"{live_server.url}/review/")
    assert _shown(page) == a.pk
    page.keyboard.press("2")  # fraud: the decision queues both actions
    assert _next(page, a.pk) == b.pk
    record = ActionRun.objects.get(decision__item=a, config__name="record")
    # Deliver it now (a live worker of another test may have taken its wake-up call first: then wait).
    assert action_run_deliver(run_id=record.pk) in ("delivered", "skipped:delivered", "skipped:delivering")
    wait_for(lambda: ActionRun.objects.get(pk=record.pk).state == "delivered", timeout=20, what="record delivered")

    page.keyboard.press("u")
    assert _next(page, b.pk) == a.pk
    box = page.locator("#undo-actions")
    expect(box).to_be_visible()
    expect(box.locator('[data-outcome="delivered"]')).to_contain_text("record (log): already delivered — cannot be "
                                                                     "withdrawn")
    expect(box.locator('[data-outcome="delivered"]')).to_contain_text("no compensating action is configured")
    expect(box.locator('[data-outcome="withdrawn"]')).to_contain_text(f"notify {HANDLER} (log): not sent yet")
    assert ActionRun.objects.get(decision__item=a, config__name__startswith="notify").state == "rejected"
    assert page.locator("#undo-actions img").count() == 0
    assert page.dialogs == []  # type: ignore[attr-defined]
