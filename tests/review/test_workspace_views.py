"""Issue 5 pages: queue filters and pages, bulk verdicts, escalate, undo, the item page, the admin queue,
figures, query-count guards and escaping of hostile content in every view."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.test import Client
from django.urls import reverse

from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Decision, Policy, ReviewTask, Verdict
from reviewapp.review.services import task_claim_next, task_escalate, verdict_submit
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_batch, make_scored_items, payment

pytestmark = pytest.mark.django_db
HX = {"HTTP_HX_REQUEST": "true"}

SCRIPT = '<script>alert("x")</script>'
HANDLER = '"><img src=x onerror=alert(1)>'
JS_URL = "javascript:alert(1)"
HOSTILE = [SCRIPT, HANDLER, JS_URL]


@pytest.fixture
def source():
    return make_payments_source(thresholds={"legit": 0.99})


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def analyst_client(analyst):
    return _client(analyst)


def _item_id(html: str) -> int:
    match = re.search(r'id="review-item"[^>]*data-item-id="(\d+)"', html, re.S)
    assert match, html[:2000]
    return int(match.group(1))


class _Inert(HTMLParser):
    """Collects what would run in a browser: on* attributes, javascript: URLs and inline script bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name.startswith("on"):
                self.active.append(f"<{tag} {name}>")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith(
                    "javascript:"):
                self.active.append(f"<{tag} {name}={value}>")
        if tag == "img":
            self.active.append("<img>")
        self._in_script = tag == "script" and not dict(attrs).get("src")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.active.append(f"inline script: {data[:40]}")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def _active_content(html: str) -> list[str]:
    parser = _Inert()
    parser.feed(html)
    return parser.active


def _rows(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr data-task-id="\d+" data-item-id="(\d+)"', html)]


# --- Queue -------------------------------------------------------------------------------------------

def test_queue_pages_by_keyset_with_next_link(analyst_client, source, settings):
    from reviewapp.review import views

    items = make_scored_items(source, [("legit", 0.5 + i / 100) for i in range(5)])
    original = views.QUEUE_PAGE_SIZE
    views.QUEUE_PAGE_SIZE = 2
    try:
        html = analyst_client.get(reverse("review:queue")).content.decode()
        assert _rows(html) == [items[0].pk, items[1].pk]
        next_url = re.search(r'id="next-page" href="([^"]+)"', html).group(1).replace("&amp;", "&")
        assert "after=" in next_url and "offset" not in next_url
        page2 = analyst_client.get(next_url, HTTP_HX_TARGET="queue-results", **HX).content.decode()
        assert _rows(page2) == [items[2].pk, items[3].pk] and "First page" in page2
    finally:
        views.QUEUE_PAGE_SIZE = original


def test_queue_filters_by_kind_batch_age_and_sort(analyst_client):
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    batch = make_batch(source, filename="may.csv")
    review, qa = make_scored_items(source, [("legit", 0.5), ("legit", 0.95)], batch=batch)
    (late,) = make_scored_items(source, [("legit", 0.2)])
    get = lambda **q: _rows(analyst_client.get(reverse("review:queue"), q).content.decode())  # noqa: E731
    assert get() == [late.pk, review.pk, qa.pk]
    assert get(sort="oldest") == [review.pk, qa.pk, late.pk]
    assert get(kind="qa") == [qa.pk]
    assert get(batch=str(batch.pk)) == [review.pk, qa.pk]
    assert get(age="24") == []
    html = analyst_client.get(reverse("review:queue")).content.decode()
    assert "may.csv" in html and 'name="age"' in html and 'name="kind"' in html and 'name="sort"' in html


def test_queue_counts_partial_shows_waiting_per_kind(analyst_client, source):
    make_scored_items(source, [("legit", 0.6), ("legit", 0.995)])
    html = analyst_client.get(reverse("review:queue_counts"), {"source": "payments"}, **HX).content.decode()
    assert re.search(r'data-kind="review">.*?<dd class="num">1</dd>', html, re.S)
    assert re.search(r'data-state="claimed-tasks">.*?<dd class="num">0</dd>', html, re.S)


def test_queue_query_count_is_flat(analyst_client, source, django_assert_max_num_queries):
    make_scored_items(source, [("legit", 0.5 + i / 100) for i in range(40)])
    # session, user, permissions (one query, cached for the request), page, sources, batches, 2 counts...
    with django_assert_max_num_queries(10):
        assert analyst_client.get(reverse("review:queue"), {"source": "payments", "label": "legit"}).status_code == 200
    with django_assert_max_num_queries(6):
        assert analyst_client.get(reverse("review:queue_counts"), **HX).status_code == 200


def test_bulk_verdict_needs_a_confirmation_and_reports_per_item(analyst_client, source):
    items = make_scored_items(source, [("legit", 0.5), ("legit", 0.6), ("legit", 0.7)])
    other = UserFactory(role="analyst")
    held = task_claim_next(user=other)
    ids = [str(i.pk) for i in items]
    confirm = analyst_client.post(reverse("review:queue_bulk"), {"item": ids, "label": "fraud", "note": SCRIPT}, **HX)
    html = confirm.content.decode()
    assert confirm.status_code == 200 and 'id="bulk-confirm"' in html and not Verdict.objects.exists()
    assert SCRIPT not in html and "&lt;script&gt;" in html
    assert all(f'name="item" value="{i}"' in html for i in ids)
    done = analyst_client.post(reverse("review:queue_bulk"),
                               {"item": ids, "label": "fraud", "note": "n", "confirm": "on"}, **HX)
    html = done.content.decode()
    assert 'id="bulk-result"' in html and "2 recorded, 1 skipped" in html
    assert "queue-changed" in done["HX-Trigger"]
    assert set(Verdict.objects.values_list("item_id", flat=True)) == {items[1].pk, items[2].pk}
    assert re.search(rf'data-item-id="{held.item_id}" class="bulk-skipped"', html)


def test_bulk_without_selection_is_refused(analyst_client, source):
    response = analyst_client.post(reverse("review:queue_bulk"), {"label": "fraud"})
    assert response.status_code == 400 and "Select at least one item" in response.content.decode()


# --- Work mode: escalate and undo ---------------------------------------------------------------------

def test_escalate_then_admin_adjudicates(analyst_client, source, admin_user):
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    analyst_client.post(reverse("review:claim"), **HX)
    response = analyst_client.post(reverse("review:escalate", args=[first.pk]), {"note": "needs a second look"},
                                   **HX)
    html = response.content.decode()
    assert _item_id(html) == second.pk and f"Escalated {first.external_id}" in html
    escalation = ReviewTask.objects.get(item=first, kind="escalation")
    assert escalation.note == "needs a second look"
    # Analysts may not see the admin queue or work it.
    assert analyst_client.get(reverse("review:adjudication")).status_code == 403
    assert analyst_client.get(reverse("review:work"), {"queue": "adjudication"}).status_code == 403
    assert analyst_client.post(reverse("review:claim"), {"queue": "adjudication"}, **HX).status_code == 403
    admin = _client(admin_user)
    page = admin.get(reverse("review:adjudication")).content.decode()
    assert first.external_id in page and "needs a second look" in page
    work = admin.get(reverse("review:work"), {"queue": "adjudication"}).content.decode()
    assert 'name="queue" value="adjudication"' in work
    claimed = admin.post(reverse("review:claim"), {"queue": "adjudication"}, **HX).content.decode()
    assert _item_id(claimed) == first.pk and 'id="escalation-note"' in claimed and 'id="peer-verdicts"' in claimed
    assert 'id="escalate-button"' not in claimed
    done = admin.post(reverse("review:verdict", args=[first.pk]), {"label": "fraud", "queue": "adjudication"}, **HX)
    assert 'id="review-empty"' in done.content.decode()
    assert Decision.objects.get(item=first, is_current=True).label == "fraud"


def test_undo_brings_the_last_item_back_and_releases_the_shown_one(analyst_client, analyst, source):
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    analyst_client.post(reverse("review:claim"), **HX)
    html = analyst_client.post(reverse("review:verdict", args=[first.pk]), {"label": "fraud"}, **HX).content.decode()
    assert _item_id(html) == second.pk and 'id="undo-button"' in html and "Undo fraud on" in html
    back = analyst_client.post(reverse("review:undo"), {"current_item": second.pk}, **HX).content.decode()
    assert _item_id(back) == first.pk and "withdrawn" in back
    assert ReviewTask.objects.get(item=second).state == "open"
    assert ReviewTask.objects.get(item=first).claimed_by == analyst
    assert Verdict.objects.get(item=first).withdrawn_at is not None
    # Nothing left to undo: the held item stays, with a notice.
    again = analyst_client.post(reverse("review:undo"), {"current_item": first.pk}, **HX).content.decode()
    assert _item_id(again) == first.pk and "Nothing undone" in again


def test_work_item_view_query_count(analyst_client, analyst, source, django_assert_max_num_queries):
    make_scored_items(source, [("legit", 0.5), ("legit", 0.6)], batch=make_batch(source, user=analyst))
    task_claim_next(user=analyst)
    # session, user, permissions (one query), the held task with its item and relations, the undoable verdict
    with django_assert_max_num_queries(5):
        assert analyst_client.get(reverse("review:work")).status_code == 200
    with django_assert_max_num_queries(8):  # the look-up below + auth (3) + the item, tasks, verdicts, decisions
        held = ReviewTask.objects.get(state="claimed").item_id
        assert analyst_client.get(reverse("review:item_history", args=[held]), **HX).status_code == 200
    item_id = ReviewTask.objects.get(state="claimed").item_id
    with django_assert_max_num_queries(22):
        # auth (3) + the item (1) + verdict: locks, writes, action configs, one audit append (13, with its
        # transaction) + next claim: one statement and one audit append (4) + its item view (1); the undo
        # line shows the verdict just recorded, without looking it up again
        html = analyst_client.post(reverse("review:verdict", args=[item_id]), {"label": "legit"}, **HX)
    assert html.status_code == 200


# --- Item page -------------------------------------------------------------------------------------------

def _explained(source: Source, text: str) -> Item:
    (item,) = make_scored_items(source, [("fraud", 0.7)], payloads=[payment("ex-1", description=text)])
    item.prediction.explanation = {
        "method": "linear", "target": "fraud", "base": -2.0,
        "features": [["amount", 1.1], ["country", -0.3], ["description", 0.8]],
        "tokens": [["description:refund", 0.7], ["description:shop", -0.2]],
    }
    item.prediction.save(update_fields=["explanation"])
    return item


def test_item_page_shows_explanation_history_and_action_runs(analyst_client, analyst, source,
                                                             django_assert_max_num_queries, monkeypatch):
    import scoring.services as scoring_services

    # Without the scoring helper's similar_decisions the panel is simply absent.
    monkeypatch.delattr(scoring_services, "similar_decisions", raising=False)
    item = _explained(source, "refund <b>now</b> at the shop")
    task_claim_next(user=analyst)
    verdict_submit(user=analyst, item=item, label="fraud", note="refund scam")
    with django_assert_max_num_queries(10):
        response = analyst_client.get(reverse("review:item", args=[item.pk]))
    html = response.content.decode()
    assert response.status_code == 200 and 'id="explanation"' in html
    assert '<mark class="tok-pos" title="+0.700 toward fraud">refund</mark>' in html
    assert '<mark class="tok-neg" title="-0.200 against fraud">shop</mark>' in html
    assert "&lt;b&gt;now&lt;/b&gt;" in html and "<b>now</b>" not in html
    assert "Toward fraud" in html and "amount" in html
    assert 'id="history"' in html and "refund scam" in html and 'class="action-runs"' in html
    assert f'href="/models/{item.prediction.model_version_id}/"' in html
    assert 'id="similar"' not in html


def test_similar_decisions_when_scoring_offers_them(analyst_client, source, monkeypatch):
    import scoring.services as scoring_services

    (item,) = make_scored_items(source, [("legit", 0.5)])
    monkeypatch.setattr(scoring_services, "similar_decisions", lambda *, item, k=5: [
        {"item_id": item.pk, "external_id": SCRIPT, "label": HANDLER, "distance": 0.123}], raising=False)
    page = analyst_client.get(reverse("review:item", args=[item.pk])).content.decode()
    assert f'hx-get="/review/items/{item.pk}/similar/"' in page
    html = analyst_client.get(reverse("review:item_similar", args=[item.pk]), **HX).content.decode()
    assert "0.123" in html and SCRIPT not in html and "<img" not in html

    def broken(*, item, k=5):
        raise RuntimeError("index missing")

    monkeypatch.setattr(scoring_services, "similar_decisions", broken)
    html = analyst_client.get(reverse("review:item_similar", args=[item.pk]), **HX).content.decode()
    assert "could not be loaded" in html


def test_double_review_hides_the_other_answer_until_decided(source):
    Policy.objects.filter(source=source).update(double_review_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.5)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    task_claim_next(user=a)
    verdict_submit(user=a, item=item, label="fraud", note="a-note")
    task_claim_next(user=b)
    seen_by_b = _client(b).get(reverse("review:work")).content.decode()
    assert _item_id(seen_by_b) == item.pk and "a-note" not in seen_by_b
    history = _client(b).get(reverse("review:item_history", args=[item.pk]), **HX).content.decode()
    assert "a-note" not in history and "1 other answer" in history
    assert "a-note" in _client(a).get(reverse("review:item_history", args=[item.pk]), **HX).content.decode()
    assert "a-note" not in _client(b).get(reverse("review:item", args=[item.pk])).content.decode()
    verdict_submit(user=b, item=item, label="fraud")
    assert "a-note" in _client(b).get(reverse("review:item", args=[item.pk])).content.decode()


# --- Figures -------------------------------------------------------------------------------------------

def test_figures_admins_see_everyone_analysts_themselves(source, admin_user):
    items = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    for user, item in ((a, items[0]), (b, items[1])):
        task_claim_next(user=user)
        verdict_submit(user=user, item=item, label="legit", handling_ms=2000)
    everyone = _client(admin_user).get(reverse("review:stats")).content.decode()
    assert f'data-reviewer="{a.username}"' in everyone and f'data-reviewer="{b.username}"' in everyone
    own = _client(a).get(reverse("review:stats"), {"days": "7"}).content.decode()
    assert f'data-reviewer="{a.username}"' in own and f'data-reviewer="{b.username}"' not in own
    assert "2.0 s" in own


def test_figures_api(analyst_api, admin_api, source):
    assert analyst_api.get("/api/v1/review/analysts/").json()["analysts"] == []
    assert admin_api.get("/api/v1/review/analysts/?days=x").status_code == 400


# --- Hostile content in every view ------------------------------------------------------------------------

def _hostile_source() -> Source:
    source = make_payments_source(slug="evil", thresholds={})
    source.labels = ["legit", SCRIPT, HANDLER]
    source.save(update_fields=["labels"])
    return source


def test_hostile_payload_labels_and_notes_are_escaped_everywhere(admin_user):
    source = _hostile_source()
    payloads = [payment("e-1", description=SCRIPT + HANDLER, merchant_category=JS_URL, country=HANDLER),
                payment("e-2", description=SCRIPT * 10)]
    first, second = make_scored_items(source, [(SCRIPT, 0.5), (HANDLER, 0.6)], payloads=payloads,
                                      batch=make_batch(source, filename=SCRIPT + ".csv"))
    analyst = UserFactory(role="analyst", username="ana")
    client = _client(analyst)
    pages = [client.post(reverse("review:claim"), **HX)]
    pages.append(client.post(reverse("review:verdict", args=[first.pk]), {"label": HANDLER, "note": SCRIPT + JS_URL},
                             **HX))
    task_escalate(user=analyst, item=second, note=SCRIPT + HANDLER)
    admin = _client(admin_user)
    pages += [
        client.get(reverse("review:queue"), {"kind": "all"}),
        client.get(reverse("review:queue_counts")),
        client.get(reverse("review:item", args=[first.pk])),
        client.get(reverse("review:item", args=[second.pk])),
        client.get(reverse("review:item_history", args=[first.pk]), **HX),
        client.get(reverse("review:stats")),
        admin.get(reverse("review:adjudication")),
        admin.post(reverse("review:claim"), {"queue": "adjudication"}, **HX),
        client.post(reverse("review:queue_bulk"), {"item": [str(second.pk)], "label": SCRIPT, "note": HANDLER}, **HX),
        client.post(reverse("review:undo"), **HX),
    ]
    for response in pages:
        html = response.content.decode()
        assert response.status_code == 200, html[:500]
        assert "<script>alert" not in html and "<img src=x" not in html, response.request["PATH_INFO"]
        assert _active_content(html) == [], response.request["PATH_INFO"]
    assert Verdict.objects.get(item=first).label == HANDLER


def test_skipping_one_task_of_a_double_review_skips_the_item(analyst_client, source):
    Policy.objects.filter(source=source).update(double_review_rate=1.0)
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    assert _item_id(analyst_client.post(reverse("review:claim"), **HX).content.decode()) == first.pk
    after_skip = analyst_client.post(reverse("review:skip", args=[first.pk]), **HX).content.decode()
    assert _item_id(after_skip) == second.pk
