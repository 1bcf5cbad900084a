"""XSS sweep in a real browser: hostile markup in every field that reaches a page (payload fields, labels,
notes, source names, schema descriptions, action names, batch filenames, reasons and errors), then every page
of the URL list visited as an analyst, an admin and an ml_engineer.

The browser context bypasses the content security policy, so that what is tested is the escaping itself (the
CSP is a second wall, checked by the authorization matrix). On every page: no dialog fires, no element or
script from a payload exists in the DOM, no ``javascript:`` link exists; and across the sweep the payload
text is shown, inert, on the pages that display those fields."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import pytest

from tests.browser import login
from tests.factories import PASSWORD, UserFactory
from tests.reliability.helpers import record_figures
from tests.security.urlmatrix import endpoints, make_objects, url_for

# Each payload tries three ways in: a script element, an event handler attribute, and breaking out of an
# attribute value. data-xss marks any element a payload managed to create.
MARK = "xss"


def hostile(field: str) -> str:
    return (
        f"<script>alert('{MARK}-{field}')</script><img src=x data-xss=1 onerror=alert(1)>"
        "\"'><svg data-xss=1 onload=alert(2)>"
    )


JS_URL = "javascript:alert('xss-url')"
NOT_PAGES = ("api/", "logout/", "healthz", "readyz", "metrics", "download/", "schema/", "docs/")
PROBE = """() => ({
  injected: document.querySelectorAll('[data-xss]').length,
  scripts: [...document.scripts].filter(s => !s.src && s.textContent.includes("alert('xss")).length,
  jsLinks: [...document.querySelectorAll('[href],[src],[action],[formaction]')].filter(e =>
      ['href', 'src', 'action', 'formaction'].some(a => (e.getAttribute(a) || '').trim().toLowerCase()
      .startsWith('javascript:'))).length,
  shown: (document.body ? document.body.innerText : '').split("<script>alert('xss").length - 1,
})"""


def plant(admin: Any, analyst: Any) -> dict[str, Any]:
    """The URL matrix's rows (one of each kind), with hostile text written into every displayed field."""
    from actions.models import ActionConfig, ActionRun, EgressAllowRule
    from reviewapp.exports.models import ExportJob
    from reviewapp.ingest.models import BatchRowError, IngestBatch, Item, SchemaVersion, Source
    from reviewapp.observability.models import AlertRule
    from reviewapp.review.models import Decision, Policy, ReviewTask, Verdict
    from scoring.models import ModelVersion

    objects = make_objects(admin, analyst)
    source = Source.objects.get(slug=objects["slug"])
    source.name = hostile("source-name")
    source.labels = [*source.labels, hostile("label")]
    source.save()
    for schema in SchemaVersion.objects.filter(source=source):
        schema.json_schema = {**schema.json_schema, "description": hostile("schema-description")}
        props = schema.json_schema.get("properties", {})
        for name in props:
            props[name] = {**props[name], "description": hostile(f"field-{name}")}
        schema.comment = hostile("schema-comment")
        schema.save()
    for item in Item.objects.filter(source=source):
        item.payload = {
            **item.payload,
            "description": hostile("payload"),
            "merchant_category": hostile("payload2"),
            "website": JS_URL,
        }
        item.payload_sha256 = hashlib.sha256(json.dumps(item.payload, sort_keys=True).encode()).hexdigest()
        item.route_reason = hostile("route-reason")[:300]
        item.save()
    ReviewTask.objects.filter(source=source).update(reason=hostile("task-reason"), note=hostile("task-note"))
    # A verdict with a note, for the history and trail pages.
    task = ReviewTask.objects.filter(source=source).first()
    Verdict.objects.get_or_create(
        task=task,
        item=task.item,
        round=task.round,
        reviewer=analyst,
        defaults={"label": "fraud", "note": hostile("verdict-note")},
    )
    Verdict.objects.filter(item__source=source).update(note=hostile("verdict-note"))
    Decision.objects.filter(item__source=source).update(reason=hostile("decision-reason"))
    Policy.objects.filter(source=source).update(comment=hostile("policy-comment"))
    ActionConfig.objects.filter(source=source).update(name=hostile("action-name"), url=JS_URL)
    ActionRun.objects.filter(config__source=source).update(
        last_error=hostile("action-error"), rejection_reason=hostile("action-rejection")
    )
    EgressAllowRule.objects.create(cidr_or_host="xss.example.com", comment=hostile("egress-comment"))
    batch = IngestBatch.objects.get(pk=objects["ids"]["batch_id"])
    batch.filename = hostile("batch") + ".csv"
    batch.error = hostile("batch-error")
    batch.notes = [hostile("batch-note")]
    batch.columns = [hostile("batch-column")]
    batch.drift = {hostile("drift-field"): 1}
    batch.save()
    BatchRowError.objects.create(
        batch=batch,
        row_number=2,
        field=hostile("row-field")[:200],
        message=hostile("row-message"),
        raw=hostile("row-raw"),
    )
    ModelVersion.objects.filter(pk=objects["model"]).update(error=hostile("model-error"))
    ExportJob.objects.filter(pk=objects["export"]).update(error=hostile("export-error"))
    # The rule's name is a slug (no markup gets past the form); its free-text fields are not.
    AlertRule.objects.filter(pk=objects["rule"]).update(
        description=hostile("alert-description")[:300],
        last_detail=hostile("alert-detail")[:500],
    )
    return objects


def pages(objects: dict[str, Any], users: dict[str, Any]) -> dict[str, list[str]]:
    """Per user, every URL of the list that answers their GET with an HTML page (200). Pages a role is refused
    show no data, so they are not visited as that role."""
    from django.test import Client

    seen: dict[str, list[str]] = {role: [] for role in users}
    candidates = [
        url_for(e, objects)
        for e in endpoints()
        if not (e.route.startswith(NOT_PAGES) or any(s in e.route for s in NOT_PAGES))
    ]
    for role, user in users.items():
        client = Client()
        client.force_login(user)
        for url in sorted(set(candidates)):
            response = client.get(url)
            if response.status_code == 200 and response.get("Content-Type", "").startswith("text/html"):
                seen[role].append(url)
    return seen


@pytest.mark.django_db(transaction=True)
def test_hostile_text_is_inert_on_every_page(live_server: Any, browser: Any) -> None:
    admin = UserFactory(username=f"xadmin{uuid.uuid4().hex[:4]}", role="admin")
    analyst = UserFactory(username=f"xana{uuid.uuid4().hex[:4]}", role="analyst")
    engineer = UserFactory(username=f"xeng{uuid.uuid4().hex[:4]}", role="ml_engineer")
    objects = plant(admin, analyst)
    started = time.monotonic()
    users = {"admin": admin, "analyst": analyst, "ml_engineer": engineer}
    by_user = pages(objects, users)
    probed_at = time.monotonic()
    urls = sorted({url for urls in by_user.values() for url in urls})
    assert len(urls) > 25, urls

    visits, shown_pages, problems = 0, set(), []
    for role, user in users.items():
        context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d, dialogs=dialogs: (dialogs.append(d.message), d.dismiss()))
        try:
            login(page, live_server, user.username, PASSWORD)
            for url in by_user[role]:
                response = page.goto(f"{live_server.url}{url}", wait_until="load")
                # htmx fragments load after the page: let them land before probing.
                page.wait_for_load_state("networkidle", timeout=15000)
                found = page.evaluate(PROBE)
                visits += 1
                status = response.status if response else 0
                if status >= 500:
                    problems.append((role, url, f"HTTP {status}"))
                if found["injected"] or found["scripts"] or found["jsLinks"]:
                    problems.append((role, url, found))
                if found["shown"]:
                    shown_pages.add(url)
            if dialogs:
                problems.append((role, "dialogs", dialogs))
        finally:
            context.close()

    assert problems == []
    # Inert, not hidden: the payload text is visible on the pages that show those fields.
    expected_to_show = {
        f"/sources/{objects['slug']}/",
        f"/batches/{objects['ids']['batch_id']}/",
        f"/review/items/{objects['ids']['item_id']}/",
        f"/actions/sources/{objects['slug']}/",
    }
    assert expected_to_show <= shown_pages, expected_to_show - shown_pages
    record_figures(
        "xss_sweep",
        tried=visits,
        pages=len(urls),
        **{f"pages_{role}": len(urls) for role, urls in by_user.items()},
        probe_seconds=round(probed_at - started, 1),
        browse_seconds=round(time.monotonic() - probed_at, 1),
        pages_showing_payload=len(shown_pages),
        injected=0,
        dialogs=0,
        lost=0,
        duplicated=0,
    )
