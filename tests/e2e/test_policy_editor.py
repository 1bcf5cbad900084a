"""An admin moves a band in the browser, watches the what-if change, saves, and finds the version in the history."""

from __future__ import annotations

import os
import re

from playwright.sync_api import expect

from reviewapp.review.models import Policy
from tests.e2e.conftest import login
from tests.factories import PASSWORD, UserFactory
from tests.review.policy_helpers import add_labeled, block, make_champion, source_setup


def test_admin_moves_a_slider_sees_the_cost_and_saves(live_server, page, transactional_db) -> None:
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    add_labeled(source, block("legit", 0.95, 100, 5, "fraud") + block("fraud", 0.8, 50, 10, "legit"), model=model)
    admin = UserFactory(username="ada", role="admin")
    login(page, live_server, admin.username, PASSWORD)
    page.goto(f"{live_server.url}/sources/payments/policy/")

    review = page.locator("#whatif-review-rate")
    expect(review).to_have_text("33.3%")  # fraud is never auto-decided: 50 of 150 labels go to review
    expect(page.locator("#thr-0-out")).to_have_text("0.9")

    # Raise the legit band above every legit prediction: everything would go to review.
    page.locator("#thr-0").fill("0.99")
    expect(page.locator("#thr-0-out")).to_have_text("0.99")
    expect(review).to_have_text("100.0%", timeout=10000)
    expect(page.locator("#whatif-auto-error")).to_contain_text("—")

    # Let fraud be auto-decided too, at 0.75: everything is auto-decided, at a 10% estimated error.
    page.locator("#thr-0").fill("0.9")
    page.locator("#auto-1").check()
    page.locator("#thr-1").fill("0.75")
    expect(review).to_have_text("0.0%", timeout=10000)
    expect(page.locator("#whatif-auto-error")).to_contain_text("10.00%")
    expect(page.locator("#whatif-n-labels")).to_contain_text("150 held-out labels")
    assert page.locator("svg.curve .mark-candidate").count() == 1

    page.fill("#comment", "auto-decide confident fraud")
    page.click("#policy-save")
    expect(page.locator(".messages")).to_contain_text("Saved policy version 2")
    row = page.locator("#policy-v2")
    expect(row).to_contain_text("auto-decide confident fraud")
    expect(row).to_contain_text("in force")
    expect(row).to_contain_text(re.compile(r"thresholds\.fraud"))
    policy = Policy.objects.get(source=source, version=2)
    assert policy.thresholds == {"legit": 0.9, "fraud": 0.75} and policy.created_by == admin
    # Target-error mode: the thresholds come from risk control; 100 legit labels at 5% error cannot support 2%.
    page.check("input[name=mode][value=target_error]")
    expect(page.locator("#target-fields")).to_be_visible()
    expect(page.locator("#threshold-fields")).to_be_hidden()
    expect(page.locator("#whatif-thresholds")).to_contain_text("none supported", timeout=10000)
    expect(review).to_have_text("100.0%")
    if os.environ.get("POLICY_SCREENSHOT"):
        page.screenshot(path=os.environ["POLICY_SCREENSHOT"], full_page=True)
    assert page.dialogs == []  # type: ignore[attr-defined]
