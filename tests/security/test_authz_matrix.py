"""The authorization matrix, generated from the URL resolver: every endpoint (HTML pages and /api/v1/*,
admin and static excluded) x every method it answers x anonymous, analyst, ml_engineer, admin.

EXPECTED is the policy written down: a new endpoint (or a new method on one) fails the test until someone
classifies it here. "Allowed" means the permission check let the request through (any answer but 401/403
or a redirect to the login page: a 400 for the empty probe body is still "allowed").

Per-source permissions do not exist (every role sees every source), so "a user of another source" is not a
distinct principal yet; when they are added, add the role here and to ROLES.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.factories import UserFactory
from tests.security.urlmatrix import denied, endpoints, make_objects, probe, url_for

ROLES = ("anonymous", "analyst", "ml_engineer", "admin")
ALL = frozenset(ROLES)
AUTH = frozenset({"analyst", "ml_engineer", "admin"})
REVIEW = frozenset({"analyst", "admin"})
ML = frozenset({"ml_engineer", "admin"})
ADMIN = frozenset({"admin"})
NOBODY: frozenset[str] = frozenset()
# login answers anyone; a signed-in user is redirected home (still "allowed").
LOGIN = ALL

EXPECTED: dict[str, dict[str, frozenset[str]]] = {
    # plumbing: probes and the scrape endpoint are public (restrict /metrics at the network edge)
    "healthz": {"GET": ALL}, "readyz": {"GET": ALL}, "metrics": {"GET": ALL},
    "api-schema": {"GET": ALL}, "api-docs": {"GET": ALL},
    "home": {"GET": AUTH, "POST": AUTH},
    "login": {"GET": LOGIN, "POST": LOGIN, "PUT": LOGIN},
    # Django's LogoutView answers with a redirect to the login page for everyone (LOGOUT_REDIRECT_URL).
    "logout": {"POST": NOBODY},
    # ingest
    "api-sources": {"GET": AUTH, "POST": ADMIN},
    "api-source-detail": {"GET": AUTH},
    "api-source-schemas": {"GET": AUTH, "POST": ADMIN},
    "api-batch-create": {"POST": ML},
    "api-item-create": {"POST": ML},
    "api-batch-detail": {"GET": AUTH},
    "api-batch-errors": {"GET": AUTH},
    "api-batch-quarantine": {"GET": AUTH},
    "api-schema-infer": {"POST": ADMIN},
    "ingest:source_infer": {"GET": ADMIN, "POST": ADMIN},
    "ingest:source_schemas": {"GET": ML, "POST": ADMIN},
    "ingest:batch_quarantine": {"GET": ML},
    "ingest:batch_quarantine_download": {"GET": ML},
    "api-item-list": {"GET": AUTH},
    "api-item-detail": {"GET": AUTH},
    "ingest:source_list": {"GET": ML},
    "ingest:source_create": {"GET": ADMIN, "POST": ADMIN},
    "ingest:source_detail": {"GET": ML},
    "ingest:batch_upload": {"POST": ML},
    "ingest:batch_detail": {"GET": ML},
    # review
    "api-queue-claim": {"POST": REVIEW},
    "api-item-release": {"POST": REVIEW},
    "api-item-lease": {"POST": REVIEW},
    "api-item-verdicts": {"POST": REVIEW},
    "api-item-escalate": {"POST": REVIEW},
    "api-verdict-undo": {"POST": REVIEW},
    "api-verdicts-bulk": {"POST": REVIEW},
    "api-analyst-figures": {"GET": REVIEW},
    "review:queue": {"GET": REVIEW},
    "review:queue_counts": {"GET": REVIEW},
    "review:queue_bulk": {"POST": REVIEW},
    "review:work": {"GET": REVIEW},
    "review:claim": {"POST": REVIEW},
    "review:verdict": {"POST": REVIEW},
    "review:skip": {"POST": REVIEW},
    "review:renew": {"POST": REVIEW},
    "review:escalate": {"POST": REVIEW},
    "review:undo": {"POST": REVIEW},
    "review:item": {"GET": REVIEW},
    "review:item_similar": {"GET": REVIEW},
    "review:item_history": {"GET": REVIEW},
    "review:stats": {"GET": REVIEW},
    "review:adjudication": {"GET": ADMIN},
    # policies: everyone signed in reads them, admins change them
    "api-source-policy": {"GET": AUTH, "PUT": ADMIN},
    "api-source-policy-simulate": {"POST": ADMIN},
    "api-source-policy-versions": {"GET": AUTH, "POST": ADMIN},
    "api-source-policy-restore": {"POST": ADMIN},
    "api-source-policy-promise": {"GET": AUTH},
    "api-source-policy-reroute": {"POST": ADMIN},
    "api-source-policy-reroute-progress": {"GET": AUTH},
    "review:policy_index": {"GET": AUTH},
    "review:policy_editor": {"GET": AUTH},
    "review:policy_simulate": {"GET": AUTH},
    "review:policy_save": {"POST": ADMIN},
    "review:policy_restore": {"POST": ADMIN},
    "review:policy_reroute_progress": {"GET": AUTH},
    # models
    "api-source-models": {"GET": AUTH, "POST": ML},
    "api-model-detail": {"GET": AUTH},
    "api-model-promote": {"POST": ML},
    "api-model-shadow": {"POST": ML},
    "api-model-risk-control": {"GET": AUTH},
    "api-item-similar": {"GET": AUTH},
    "scoring:model_list": {"GET": AUTH},
    "scoring:model_detail": {"GET": AUTH},
    "scoring:model_promote": {"POST": ML},
    "scoring:model_shadow": {"POST": ML},
    "scoring:model_train": {"POST": ML},
    # exports
    "api-labels-export": {"GET": ML},
    "api-export-jobs": {"GET": ML, "POST": ML},
    "api-export-job": {"GET": ML},
    "api-export-download": {"GET": ML},
    "exports:list": {"GET": ML, "POST": ML},
    "exports:rows": {"GET": ML},
    "exports:detail": {"GET": ML},
    "exports:download": {"GET": ML},
    # actions
    "api-source-actions": {"GET": ADMIN, "POST": ADMIN},
    "api-decision-actions": {"GET": REVIEW},
    "api-action-runs": {"GET": ADMIN},
    "api-action-run-approve": {"POST": ADMIN},
    "api-action-run-reject": {"POST": ADMIN},
    "api-action-run-replay": {"POST": ADMIN},
    "actions:run_list": {"GET": ADMIN, "POST": ADMIN},
    "actions:source_actions": {"GET": ADMIN, "POST": ADMIN},
    "actions:run_approve": {"POST": ADMIN},
    "actions:run_reject": {"POST": ADMIN},
    "actions:run_replay": {"POST": ADMIN},
    # observability (the decision trail is for auditors: ml engineers and admins)
    "api-decision-trail": {"GET": ML},
    "observability:dashboard": {"GET": ADMIN},
    "observability:alerts": {"GET": ADMIN},
    "observability:alert_rule_edit": {"POST": ADMIN},
    "observability:drift": {"GET": ML},
    "observability:drift_compute": {"POST": ML},
    "observability:decision_trail": {"GET": ML},
}


@pytest.fixture
def people(transactional_db: None, settings: Any) -> dict[str, Any]:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return {
        "analyst": UserFactory(username="mx-analyst", role="analyst"),
        "ml_engineer": UserFactory(username="mx-ml", role="ml_engineer"),
        "admin": UserFactory(username="mx-admin", role="admin"),
    }


def _client(role: str, people: dict[str, Any]) -> Client:
    # A fresh client per probe: the logout probe must not sign the next probe out.
    client = Client()
    if role != "anonymous":
        client.force_login(people[role])
    return client


def test_every_endpoint_is_classified() -> None:
    names = {e.name for e in endpoints()}
    assert sorted(names - set(EXPECTED)) == [], "new endpoints: classify them in EXPECTED"
    assert sorted(set(EXPECTED) - names) == [], "EXPECTED names endpoints that no longer exist"


def test_authorization_matrix_has_no_mismatch(people: dict[str, Any]) -> None:
    objects = make_objects(people["admin"], people["analyst"])
    mismatches: list[str] = []
    missing_csp: list[str] = []
    probed = 0
    for endpoint in endpoints():
        url = url_for(endpoint, objects)
        # The methods an endpoint has are those the admin's probe did not answer 405.
        answered = probe(_client("admin", people), endpoint, url)
        expected = EXPECTED.get(endpoint.name, {})
        if set(answered) != set(expected):
            mismatches.append(f"{endpoint.name}: methods {sorted(answered)} != expected {sorted(expected)}")
        for role in ROLES:
            responses = answered if role == "admin" else probe(_client(role, people), endpoint, url)
            for method in answered:
                response = responses.get(method)
                probed += 1
                if response is None:
                    continue
                allowed = not denied(response)
                if allowed != (role in expected.get(method, NOBODY)):
                    mismatches.append(f"{endpoint.name} {method} as {role}: got {response.status_code}, "
                                      f"expected {'allowed' if allowed is False else 'denied'}")
                if "Content-Security-Policy" not in response.headers:
                    missing_csp.append(f"{endpoint.name} {method} as {role}")
    assert mismatches == [], "\n".join(mismatches)
    # The CSP middleware covers every answer, pages, API, redirects and errors alike.
    assert missing_csp == []
    from tests.reliability.helpers import record_figures

    record_figures("authorization_matrix", tried=probed, endpoints=len(endpoints()), mismatches=len(mismatches),
                   lost=0, duplicated=0)


def test_unsafe_session_requests_need_a_csrf_token(people: dict[str, Any]) -> None:
    objects = make_objects(people["admin"], people["analyst"])
    client = Client(enforce_csrf_checks=True)
    client.force_login(people["admin"])
    # The API under session auth (DRF's SessionAuthentication enforces CSRF) and an HTML form post.
    api = client.post("/api/v1/sources/", data="{}", content_type="application/json")
    assert api.status_code == 403 and "CSRF" in api.json()["detail"]
    page = client.post(f"/sources/{objects['slug']}/policy/save/", data={})
    assert page.status_code == 403
    # With the token, the same form post gets past CSRF (to validation or a redirect).
    client.get("/sources/")
    token = client.cookies["csrftoken"].value
    ok = client.post(f"/sources/{objects['slug']}/policy/save/", data={}, HTTP_X_CSRFTOKEN=token)
    assert ok.status_code != 403
