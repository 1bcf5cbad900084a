from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from reviewapp.ingest.models import Item
from reviewapp.review.models import ReviewTask, Verdict
from reviewapp.review.services import task_claim_next
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_batch, make_scored_items, payment

pytestmark = pytest.mark.django_db
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def source():
    return make_payments_source(thresholds={"legit": 0.99})


@pytest.fixture
def client_for():
    def make(user) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def analyst_client(analyst, client_for):
    return client_for(analyst)


def _item_id(html: str) -> int:
    match = re.search(r'id="review-item"[^>]*data-item-id="(\d+)"', html, re.S)
    assert match, html[:2000]
    return int(match.group(1))


# --- Queue -------------------------------------------------------------------------------------------

def test_queue_page_lists_waiting_items_with_counts(analyst_client, source):
    make_scored_items(source, [("fraud", 0.71), ("legit", 0.995), ("legit", 0.6)])
    response = analyst_client.get(reverse("review:queue"))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'href="/static/css/review.css"' in html
    assert html.count('<tr data-task-id=') == 2
    assert 'id="queue-counts"' in html and 'hx-trigger="every 5s, queue-changed from:body"' in html
    assert 'data-state="queued"' in html and 'id="start-reviewing"' in html
    assert "fraud 0.71 below its threshold" not in html  # fraud has no threshold here
    assert "no threshold for label fraud" in html


def test_queue_filters_and_htmx_partial(analyst_client, source):
    make_scored_items(source, [("fraud", 0.71), ("legit", 0.6), ("legit", 0.3)])
    response = analyst_client.get(reverse("review:queue"), {"source": "payments", "label": "legit",
                                                              "min_confidence": "0.5"},
                                  HTTP_HX_TARGET="queue-results", **HX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and html.count("<tr data-task-id=") == 1
    assert 'id="next-page"' not in html


def test_queue_counts_partial(analyst_client, source):
    make_scored_items(source, [("legit", 0.6), ("legit", 0.995)])
    response = analyst_client.get(reverse("review:queue_counts"), {"source": "payments"}, **HX)
    html = response.content.decode()
    assert response.status_code == 200 and "<html" not in html
    assert re.search(r'data-state="queued">.*?<dd class="num">1</dd>', html, re.S)
    assert re.search(r'data-state="auto_decided">.*?<dd class="num">1</dd>', html, re.S)


def test_queue_page_query_count_is_flat(analyst_client, source, django_assert_max_num_queries):
    make_scored_items(source, [("legit", 0.5 + i / 100) for i in range(30)])
    with django_assert_max_num_queries(12):
        assert analyst_client.get(reverse("review:queue")).status_code == 200


def test_review_pages_need_the_review_permission(ml_engineer, client_for, source):
    client = client_for(ml_engineer)
    assert client.get(reverse("review:queue")).status_code == 403
    assert client.get(reverse("review:work")).status_code == 403
    assert client.post(reverse("review:claim"), **HX).status_code == 403
    anonymous = Client().get(reverse("review:queue"))
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]


# --- Work mode -------------------------------------------------------------------------------------

def test_work_page_get_changes_nothing_and_claims_on_load(analyst_client, source):
    make_scored_items(source, [("legit", 0.5)])
    response = analyst_client.get(reverse("review:work"))
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="review-claim"' in html and 'hx-trigger="load, submit"' in html
    assert 'src="/static/js/review.js"' in html and 'href="/static/css/review.css"' in html
    assert not ReviewTask.objects.filter(state="claimed").exists()


def test_claim_renders_item_with_confidence_and_provenance(analyst_client, analyst, source):
    batch = make_batch(source, user=analyst, filename="june.csv")
    (item,) = make_scored_items(source, [("fraud", 0.71)], batch=batch)
    response = analyst_client.post(reverse("review:claim"), {"source": "payments"}, **HX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert _item_id(html) == item.pk
    assert re.search(r'id="predicted-label"[^>]*>fraud<', html)
    assert re.search(r'id="confidence"[^>]*>71.0%<', html)
    assert 'id="provenance"' in html and "june.csv" in html and analyst.username in html
    assert f'href="/models/{item.prediction.model_version_id}/"' in html
    assert "no threshold for label fraud" in html and "v1.0" in html
    order = [html.index(f'data-field="{name}"') for name in ("payment_id", "amount", "hour", "description")]
    assert order == sorted(order)
    assert 'data-label="legit"' in html and 'data-key="1"' in html and 'data-key="2"' in html
    assert 'name="idempotency_key"' in html
    assert 'id="alternatives"' in html and "29.0%" in html
    assert ReviewTask.objects.get(item=item).claimed_by == analyst


def test_work_page_shows_a_held_claim(analyst_client, analyst, source):
    (item,) = make_scored_items(source, [("fraud", 0.71)])
    task_claim_next(user=analyst)
    response = analyst_client.get(reverse("review:work"))
    html = response.content.decode()
    assert _item_id(html) == item.pk and 'id="confidence"' in html and 'id="provenance"' in html


def test_claim_without_htmx_redirects_to_the_work_page(analyst_client, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    response = analyst_client.post(reverse("review:claim"), {"source": "payments"})
    assert response.status_code == 302 and response["Location"] == "/review/?source=payments"
    assert _item_id(analyst_client.get(response["Location"]).content.decode()) == item.pk


def test_htmx_verdict_returns_the_next_item(analyst_client, analyst, source):
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    analyst_client.post(reverse("review:claim"), **HX)
    response = analyst_client.post(
        reverse("review:verdict", args=[first.pk]),
        {"label": "fraud", "note": "looks off", "idempotency_key": "ui-key-1", "handling_ms": "2500"}, **HX,
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and _item_id(html) == second.pk
    verdict = Verdict.objects.get(item=first)
    assert (verdict.label, verdict.note, verdict.handling_ms, verdict.idempotency_key) == (
        "fraud", "looks off", 2500, "ui-key-1")
    assert Item.objects.get(pk=first.pk).state == "decided"
    # The retry of a verdict whose response was lost changes nothing and shows the same next item.
    retry = analyst_client.post(reverse("review:verdict", args=[first.pk]),
                                {"label": "fraud", "idempotency_key": "ui-key-1"}, **HX)
    assert _item_id(retry.content.decode()) == second.pk and Verdict.objects.count() == 1
    # Last item: the empty-queue partial.
    done = analyst_client.post(reverse("review:verdict", args=[second.pk]), {"label": "legit"}, **HX)
    assert 'id="review-empty"' in done.content.decode()


def test_verdict_conflict_shows_a_notice_and_moves_on(analyst_client, client_for, source):
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    other = UserFactory(role="analyst")
    task_claim_next(user=other)  # holds `first`
    response = analyst_client.post(reverse("review:verdict", args=[first.pk]), {"label": "legit"}, **HX)
    html = response.content.decode()
    assert response.status_code == 200 and "claimed by someone else" in html
    assert _item_id(html) == second.pk
    assert not Verdict.objects.exists()


def test_verdict_with_a_label_outside_the_set_is_400(analyst_client, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    analyst_client.post(reverse("review:claim"), **HX)
    response = analyst_client.post(reverse("review:verdict", args=[item.pk]), {"label": "spam"}, **HX)
    assert response.status_code == 400 and not Verdict.objects.exists()


def test_skip_gives_the_item_back_and_shows_another(analyst_client, source):
    first, second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    analyst_client.post(reverse("review:claim"), **HX)
    response = analyst_client.post(reverse("review:skip", args=[first.pk]), **HX)
    assert _item_id(response.content.decode()) == second.pk
    assert ReviewTask.objects.get(item=first).state == "open"
    assert Item.objects.get(pk=first.pk).state == "queued"
    # Skipping the last one leaves an empty slot that offers the skipped items back.
    empty = analyst_client.post(reverse("review:skip", args=[second.pk]), **HX).content.decode()
    assert 'id="review-empty"' in empty and "Include skipped items" in empty
    again = analyst_client.post(reverse("review:claim"), {"include_skipped": "on"}, **HX)
    assert _item_id(again.content.decode()) == first.pk


def test_lease_renewal_view(analyst_client, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    assert analyst_client.post(reverse("review:renew", args=[item.pk])).status_code == 409
    analyst_client.post(reverse("review:claim"), **HX)
    response = analyst_client.post(reverse("review:renew", args=[item.pk]))
    assert response.status_code == 200 and response.json()["lease_expires_at"]


def test_payload_is_escaped(analyst_client, source):
    evil = payment("x-1", description="<script>alert(1)</script>", merchant_category='"><img src=x onerror=alert(2)>')
    long_evil = payment("x-2", description="<script>alert(3)</script>" + "a" * 300)
    make_scored_items(source, [("legit", 0.5), ("legit", 0.6)], payloads=[evil, long_evil])
    html = analyst_client.post(reverse("review:claim"), **HX).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    item_id = _item_id(html)
    html = analyst_client.post(reverse("review:verdict", args=[item_id]), {"label": "legit"}, **HX).content.decode()
    assert "<script>alert(3)" not in html and "<details><summary>&lt;script&gt;alert(3)" in html


def test_label_field_is_not_shown_to_the_reviewer(analyst_client, source):
    make_scored_items(source, [("legit", 0.5)], payloads=[payment("y-1", is_fraud="fraud")])
    html = analyst_client.post(reverse("review:claim"), **HX).content.decode()
    assert 'data-field="is_fraud"' not in html
