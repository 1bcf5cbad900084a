"""Walk the URL resolver and probe every endpoint as each role. Used by the authorization matrix and
the CSP check; kept apart so that both see the same list of endpoints."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

EXCLUDED_PREFIXES = ("admin/", "static/")
METHODS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Endpoint:
    name: str
    route: str
    view: Any


def endpoints() -> list[Endpoint]:
    """Every named route of reviewapp.urls, admin and static excluded."""
    found: list[Endpoint] = []

    def walk(patterns: list[Any], prefix: str, namespace: str | None) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            if route.startswith(EXCLUDED_PREFIXES):
                continue
            if isinstance(p, URLResolver):
                ns = p.namespace
                walk(p.url_patterns, route, f"{namespace}:{ns}" if namespace and ns else (ns or namespace))
            elif isinstance(p, URLPattern):
                name = f"{namespace}:{p.name}" if namespace and p.name else (p.name or route)
                found.append(Endpoint(name=name, route=route, view=p.callback))

    walk(get_resolver().url_patterns, "", None)
    return found


def methods_of(endpoint: Endpoint) -> list[str] | None:
    """The handlers a class-based view defines; None for function views (probe GET and POST)."""
    view_class = getattr(endpoint.view, "view_class", None) or getattr(endpoint.view, "cls", None)
    if view_class is None:
        return None
    return [m for m in METHODS if hasattr(view_class, m) and m in view_class.http_method_names]


def make_objects(admin: Any, analyst: Any) -> dict[str, Any]:
    """One real row for each kind of URL argument, so that a probe reaches the permission check and not a 404."""
    from actions.models import ActionRun
    from reviewapp.exports.models import ExportJob
    from reviewapp.ingest.models import IngestBatch
    from reviewapp.observability.models import AlertRule
    from scoring.models import ModelVersion
    from tests.actions.helpers import decide, make_config
    from tests.factories import make_payments_source
    from tests.reliability.helpers import make_review_items

    source = make_payments_source(slug="authz")
    make_config(source, admin, url="https://hooks.example.com/x")
    ((item_id, _),) = make_review_items(source, 1, claimed_by=analyst)
    from reviewapp.ingest.models import Item

    decision = decide(Item.objects.get(pk=make_review_items(source, 1)[0][0]), label="fraud")
    run = ActionRun.objects.filter(decision=decision).first()
    model = ModelVersion.objects.create(source=source, version=1, algorithm="logreg", status="ready")
    batch = IngestBatch.objects.create(
        source=source, schema_version=source.schema_versions.first(), filename="x.csv", file_format="csv",
        content_sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest(), status="done")
    export = ExportJob.objects.create(source=source, file_format="csv", cutoff=timezone.now() - timedelta(1))
    rule = AlertRule.objects.create(name="authz-rule", metric="queue_age_seconds", threshold=1.0)
    ids = {"item_id": item_id, "decision_id": decision.pk, "run_id": run.pk if run else 1, "batch_id": batch.pk}
    return {"slug": source.slug, "ids": ids, "model": model.pk, "export": export.pk, "rule": rule.pk,
            "decision": decision.pk}


def url_for(endpoint: Endpoint, objects: dict[str, Any]) -> str:
    """Fill the route's arguments with the real rows."""
    import re

    pk_by_prefix = {"models/": objects["model"], "exports/": objects["export"], "dashboard/alerts/": objects["rule"],
                    "decisions/": objects["decision"], "api/v1/models/": objects["model"],
                    "api/v1/exports/": objects["export"], "api/v1/decisions/": objects["decision"]}

    def fill(match: re.Match[str]) -> str:
        converter, name = match.group(1), match.group(2)
        if name == "slug":
            return objects["slug"]
        if name in objects["ids"]:
            return str(objects["ids"][name])
        if name == "version":
            return "1"
        if name == "run_id":
            return "no-such-run"
        if name == "pk":
            if endpoint.route.startswith(("api/v1/items/", "review/items/")):
                return str(objects["ids"]["item_id"])
            for prefix in sorted(pk_by_prefix, key=len, reverse=True):
                if endpoint.route.startswith(prefix):
                    return str(pk_by_prefix[prefix])
        raise AssertionError(f"no value for <{converter}:{name}> in {endpoint.route}")

    return "/" + re.sub(r"<(?:(\w+):)?(\w+)>", fill, endpoint.route)


def denied(response: Any) -> bool:
    """Refused: 401/403, or an HTML redirect to the login page."""
    if response.status_code in (401, 403):
        return True
    return response.status_code == 302 and "/login/" in response.get("Location", "")


def probe(client: Client, endpoint: Endpoint, url: str) -> dict[str, Any]:
    """{METHOD: response} for every method the endpoint answers (405 is "does not exist")."""
    methods = methods_of(endpoint) or ["get", "post"]
    out = {}
    for method in methods:
        kwargs: dict[str, Any] = {"content_type": "application/json"} if method != "get" else {}
        response = getattr(client, method)(url, **({"data": "{}"} if method != "get" else {}), **kwargs)
        if response.status_code == 405:
            continue
        out[method.upper()] = response
    return out
