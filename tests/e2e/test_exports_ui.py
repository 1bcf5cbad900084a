"""An ML engineer starts an export in the browser, watches it finish and downloads the file."""

import csv
import io
from pathlib import Path

from playwright.sync_api import expect

from tests.e2e.conftest import login
from tests.exports.conftest import make_labeled
from tests.factories import PASSWORD, UserFactory, make_payments_source


def test_export_started_from_the_ui(live_worker, live_server, page):
    source = make_payments_source(slug="uiexport")
    make_labeled(source, 12)
    engineer = UserFactory(username="emil", role="ml_engineer")
    login(page, live_server, engineer.username, PASSWORD)
    page.goto(f"{live_server.url}/exports/")
    page.select_option("#id_source", "uiexport")
    page.select_option("#id_format", "csv")
    page.click("#export-form button[type=submit]")
    row = page.locator("tr[data-export-id]").first
    expect(row).to_have_attribute("data-status", "done", timeout=60000)
    with page.expect_download() as download_info:
        row.get_by_role("link", name="Download").click()
    path = download_info.value.path()
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    assert len(rows) == 12 and rows[0]["source"] == "uiexport"
    assert page.dialogs == []  # type: ignore[attr-defined]
