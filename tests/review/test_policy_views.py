"""Policy editor pages: admins get controls, others see numbers only; saves, restores, the htmx what-if."""

from __future__ import annotations

import pytest

from reviewapp.review.models import Policy
from tests.review.policy_helpers import add_labeled, block, make_champion, source_setup

pytestmark = pytest.mark.django_db

URL = "/sources/payments/policy/"


@pytest.fixture
def source():
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    add_labeled(source, block("legit", 0.95, 100, 5, "fraud") + block("fraud", 0.8, 50, 10, "legit"), model=model)
    return source


def test_admin_sees_the_editor(client, admin_user, source) -> None:
    client.force_login(admin_user)
    response = client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="policy-form"' in html and 'type="range"' in html and 'name="thr_0"' in html
    assert 'id="whatif-review-rate"' in html and "<svg" in html and 'class="curve"' in html
    assert 'id="history"' in html and "v1" in html and 'id="promise"' in html
    assert "Restore" not in html  # only one version: nothing to restore


@pytest.mark.parametrize("user_fixture", ["analyst", "ml_engineer"])
def test_others_see_no_controls(request, client, user_fixture, source) -> None:
    client.force_login(request.getfixturevalue(user_fixture))
    response = client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="policy-form"' not in html and 'type="range"' not in html and "Restore" not in html
    assert 'id="policy-readonly"' in html and "Only admins change policies." in html
    assert client.post(f"{URL}save/", {"mode": "threshold"}).status_code == 403
    assert client.post(f"{URL}restore/1/").status_code == 403
    assert Policy.objects.filter(source=source).count() == 1


def test_htmx_simulate_partial_reacts_to_the_candidate(client, admin_user, source) -> None:
    client.force_login(admin_user)
    params = {"thresholds_sent": "1", "mode": "threshold", "auto_0": "1", "thr_0": "0.9", "qa_sample_rate": "0"}
    a = client.get(f"{URL}simulate/", params, HTTP_HX_REQUEST="true")
    assert a.status_code == 200
    assert "<html" not in a.content.decode() and 'id="whatif-review-rate"' in a.content.decode()
    assert 'data-review-rate="0.3333' in a.content.decode()  # fraud is never auto: 50 of 150 to review
    b = client.get(f"{URL}simulate/", {**params, "thr_0": "0.99"}, HTTP_HX_REQUEST="true")
    assert 'data-review-rate="1.0"' in b.content.decode()
    bad = client.get(f"{URL}simulate/", {**params, "thr_0": "x"}, HTTP_HX_REQUEST="true")
    assert bad.status_code == 400


def test_save_and_restore_from_the_page(client, admin_user, source) -> None:
    client.force_login(admin_user)
    response = client.post(f"{URL}save/", {"thresholds_sent": "1", "mode": "threshold", "auto_0": "1",
                                           "thr_0": "0.97", "auto_1": "1", "thr_1": "0.999",
                                           "qa_sample_rate": "0.05", "priority": "oldest",
                                           "comment": "<b>tighter</b>"})
    assert response.status_code == 302
    policy = Policy.objects.get(source=source, version=2)
    assert policy.thresholds == {"legit": 0.97, "fraud": 0.999} and policy.priority == "oldest"
    assert policy.created_by == admin_user and policy.comment == "<b>tighter</b>"
    page = client.get(URL).content.decode()
    assert "&lt;b&gt;tighter&lt;/b&gt;" in page and "<b>tighter</b>" not in page  # escaped
    assert 'id="policy-v2"' in page and "Restore" in page
    response = client.post(f"{URL}restore/1/")
    assert response.status_code == 302
    assert Policy.objects.get(source=source, version=3).thresholds == {"legit": 0.9}
    assert client.post(f"{URL}restore/42/").status_code == 404


def test_save_with_errors_rerenders(client, admin_user, source) -> None:
    client.force_login(admin_user)
    response = client.post(f"{URL}save/", {"mode": "target_error", "target_error": "1.5"})
    assert response.status_code == 400
    assert "target_error" in response.content.decode()
    assert Policy.objects.filter(source=source).count() == 1


def test_save_with_reroute_shows_progress(client, admin_user, source) -> None:
    client.force_login(admin_user)
    response = client.post(f"{URL}save/", {"mode": "threshold", "thresholds_sent": "1", "reroute": "1"})
    assert response.status_code == 302 and "?run=" in response["Location"]
    page = client.get(response["Location"]).content.decode()
    assert 'id="reroute-progress"' in page
    run = response["Location"].split("run=")[1]
    partial = client.get(f"{URL}reroute/", {"run": run}, HTTP_HX_REQUEST="true")
    assert partial.status_code == 200 and 'id="reroute-progress"' in partial.content.decode()


def test_index_lists_policies(client, admin_user, source) -> None:
    client.force_login(admin_user)
    html = client.get("/policies/").content.decode()
    assert URL in html and "legit ≥ 0.9" in html


def test_unknown_source_is_404(client, admin_user) -> None:
    client.force_login(admin_user)
    assert client.get("/sources/nope/policy/").status_code == 404


def test_promise_breach_alert_on_the_page(client, admin_user) -> None:
    from reviewapp.ingest.models import Item
    from reviewapp.review.models import Label
    from reviewapp.review.policy_services import policy_update
    from tests.review.helpers import make_scored_items

    source = source_setup()
    model = make_champion(source, risk_control={"target_error": 0.02, "confidence": 0.95,
                                                "thresholds": {"legit": 0.99}, "evidence": {}})
    policy_update(source=source, actor=admin_user, mode="target_error", target_error=0.02, confidence=0.95)
    items = make_scored_items(source, [("legit", 0.999)] * 40, model=model)
    assert all(i.state == Item.State.AUTO_DECIDED for i in items)
    Label.objects.bulk_create([Label(item=i, source=source, label="fraud" if n < 8 else "legit",
                                     origin=Label.Origin.QA) for n, i in enumerate(items)])
    client.force_login(admin_user)
    html = client.get(URL).content.decode()
    assert "The promise is broken" in html and 'class="badge promise-breach"' in html
    assert "8 of 40 overturned" in html
