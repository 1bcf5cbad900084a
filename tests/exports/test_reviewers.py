"""The ``reviewers`` column: everyone who answered in a label's final round (and the adjudicator), made by the
real review services (double review, adjudication, escalation), in every format and on both paths."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.utils import timezone

from reviewapp.exports.services import (
    ExportFilters,
    ExportSpec,
    Snapshot,
    _python_stream,
    count_rows,
    export_job_create,
    export_job_run,
    stream_export,
)
from reviewapp.ingest.models import Item
from reviewapp.review.models import Label, Policy, ReviewTask, Verdict
from reviewapp.review.services import task_claim_next, task_escalate, verdict_submit
from tests.exports.conftest import make_labeled
from tests.exports.test_exports import _json_build_object_reference, _read
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_scored_items

pytestmark = pytest.mark.django_db


def _answer(user: Any, label: str) -> None:
    task = task_claim_next(user=user)
    assert task is not None
    verdict_submit(user=user, item=Item.objects.select_related("source").get(pk=task.item_id), label=label)


@pytest.fixture
def reviewed() -> dict[str, Any]:
    """Items decided one after another (so each claim lands on the item just made):
    agreed (zed then amy), adjudicated (amy fraud, zed legit, boss decides), escalated (amy answers, zed
    escalates its twin, boss resolves), a single review by amy, and an imported label."""
    source = make_payments_source(thresholds={})
    Policy.objects.filter(source=source).update(double_review_rate=1.0)
    amy, zed = UserFactory(username="amy", role="analyst"), UserFactory(username="zed", role="analyst")
    boss = UserFactory(username="boss", role="admin")
    ids = {}

    (item,) = make_scored_items(source, [("legit", 0.6)])
    _answer(zed, "legit")
    _answer(amy, "legit")
    ids["agreed"] = item.external_id

    (item,) = make_scored_items(source, [("legit", 0.6)])
    _answer(amy, "fraud")
    _answer(zed, "legit")
    task = task_claim_next(user=boss, queue="adjudication")
    verdict_submit(user=boss, item=Item.objects.get(pk=task.item_id), label="fraud")
    ids["adjudicated"] = item.external_id

    (item,) = make_scored_items(source, [("legit", 0.6)])
    _answer(amy, "fraud")
    twin = task_claim_next(user=zed)
    assert twin.item_id == item.pk
    task_escalate(user=zed, item=Item.objects.get(pk=item.pk), note="not sure")
    task = task_claim_next(user=boss, queue="adjudication")
    verdict_submit(user=boss, item=Item.objects.get(pk=task.item_id), label="legit")
    ids["escalated"] = item.external_id

    Policy.objects.filter(source=source).update(double_review_rate=0.0)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    _answer(amy, "legit")
    ids["single"] = item.external_id

    (label,) = make_labeled(source, 1, start=7000)
    ids["imported"] = label.item.external_id
    assert Label.objects.filter(source=source, is_active=True).count() == 5
    return {"source": source, "ids": ids}


# Final-round people in order of their verdicts (not by name), the adjudicator's last.
EXPECTED = {
    "agreed": (["zed", "amy"], "amy", "review"),
    "adjudicated": (["amy", "zed", "boss"], "boss", "adjudication"),
    "escalated": (["amy", "boss"], "boss", "adjudication"),
    "single": (["amy"], "amy", "review"),
    "imported": (None, None, "import"),
}


def _export(source: Any, fmt: str, filters: ExportFilters | None = None, snapshot: Snapshot | None = None) -> bytes:
    spec = ExportSpec(source, fmt, filters or ExportFilters(), snapshot or Snapshot.now())
    return b"".join(stream_export(spec))


def _by_name(fmt: str, data: bytes, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    frame = _read(fmt, data)
    names = {external_id: name for name, external_id in ids.items()}
    return {names[row["external_id"]]: row for row in frame.to_dict("records")}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_reviewers_name_everyone_in_the_final_round(reviewed, fmt):
    rows = _by_name(fmt, _export(reviewed["source"], fmt), reviewed["ids"])
    assert set(rows) == set(EXPECTED)
    for name, (reviewers, reviewer, origin) in EXPECTED.items():
        row = rows[name]
        assert row["label_origin"] == origin, name
        if reviewer is None:  # an import: no verdict, no reviewer (empty in CSV, null in JSON and Parquet)
            assert row["reviewer"] is None or row["reviewer"] != row["reviewer"]
            assert row["reviewers"] is None or row["reviewers"] != row["reviewers"]
            continue
        assert row["reviewer"] == reviewer, name  # the old column is unchanged: the deciding verdict's
        if fmt == "csv":
            assert row["reviewers"] == ";".join(reviewers), name
        else:
            assert list(row["reviewers"]) == reviewers, name


def test_parquet_reviewers_is_a_list_of_strings(reviewed):
    table = pq.read_table(io.BytesIO(_export(reviewed["source"], "parquet")))
    kind = table.schema.field("reviewers").type
    assert pa.types.is_list(kind) and kind.value_type == pa.string()
    assert sorted(v for v in table.column("reviewers").to_pylist() if v) == sorted(
        r for r, _, _ in EXPECTED.values() if r
    )


def test_jsonl_reviewers_keep_the_json_build_object_format(reviewed):
    for filters in (ExportFilters(), ExportFilters(reviewer="zed")):
        spec = ExportSpec(reviewed["source"], "jsonl", filters, Snapshot.now(), include_raw=True)
        data = b"".join(stream_export(spec))
        assert data == _json_build_object_reference(spec)
    line = next(x for x in data.splitlines() if b'"boss"' in x and b'"zed"' in x)
    assert b'"reviewers" : ["amy","zed","boss"]' in line


def test_reviewer_filter_matches_any_reviewer(reviewed):
    source, ids = reviewed["source"], reviewed["ids"]
    for who, expected in (("zed", {"agreed", "adjudicated"}), ("amy", set(EXPECTED) - {"imported"})):
        filters = ExportFilters(reviewer=who)
        rows = _by_name("jsonl", _export(source, "jsonl", filters), ids)
        assert set(rows) == expected, who
        assert count_rows(ExportSpec(source, "csv", filters, Snapshot.now())) == len(expected)
        portable = b"".join(_python_stream(ExportSpec(source, "jsonl", filters, Snapshot.now())))
        assert set(_by_name("jsonl", portable, ids)) == expected, who
    boss = _by_name("csv", _export(source, "csv", ExportFilters(reviewer="boss")), ids)
    assert set(boss) == {"adjudicated", "escalated"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_portable_path_gives_the_same_reviewers(reviewed, fmt):
    """The ORM path (SQLite) and the COPY path agree, value for value, in each format."""
    source = reviewed["source"]
    spec = ExportSpec(source, fmt, ExportFilters(), Snapshot.now())
    copied = b"".join(stream_export(spec))
    portable = b"".join(_python_stream(spec))
    if fmt == "parquet":
        ours, theirs = pq.read_table(io.BytesIO(portable)), pq.read_table(io.BytesIO(copied))
        assert ours.schema == theirs.schema
        assert ours.column("reviewers").to_pylist() == theirs.column("reviewers").to_pylist()
        assert ours.column("reviewer").to_pylist() == theirs.column("reviewer").to_pylist()
    elif fmt == "jsonl":
        assert [json.loads(x) for x in portable.splitlines()] == [json.loads(x) for x in copied.splitlines()]
    else:
        ours, theirs = _read("csv", portable), _read("csv", copied)
        assert ours["reviewers"].fillna("").tolist() == theirs["reviewers"].fillna("").tolist()
        assert "zed;amy" in theirs["reviewers"].tolist()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_reviewers_are_pinned_by_the_snapshot(reviewed, fmt):
    """A verdict withdrawn after the cut-off still counts, so the same snapshot gives the same bytes."""
    source = reviewed["source"]
    snapshot = Snapshot.now()
    first = _export(source, fmt, snapshot=snapshot)
    item = Item.objects.get(source=source, external_id=reviewed["ids"]["adjudicated"])
    zed_verdict = Verdict.objects.get(item=item, reviewer__username="zed")
    Verdict.objects.filter(pk=zed_verdict.pk).update(withdrawn_at=timezone.now())
    assert _export(source, fmt, snapshot=snapshot) == first
    later = _by_name(fmt, _export(source, fmt), reviewed["ids"])["adjudicated"]["reviewers"]
    assert (later if fmt == "csv" else list(later)) == ("amy;boss" if fmt == "csv" else ["amy", "boss"])


def test_manifest_lists_the_reviewers_column(reviewed, settings, tmp_path):
    settings.EXPORT_ROOT = tmp_path / "exports"
    engineer = UserFactory(username="ml", role="ml_engineer")
    job = export_job_create(actor=engineer, source=reviewed["source"], fmt="parquet", filters=ExportFilters())
    job = export_job_run(job_id=job.pk)
    columns = job.manifest["columns"]
    assert {"name": "reviewers", "type": "list<string>"} in columns
    names = [c["name"] for c in columns]
    assert names.index("reviewers") == names.index("reviewer") + 1
    table = pq.read_table(job.file_path)
    assert table.schema.names == names and job.manifest["row_count"] == 5


def test_double_review_tasks_share_the_round_the_export_reads(reviewed):
    """The premise of the final-round join: both tasks of a double review carry one round, and an
    adjudication points at the task whose answer disagreed."""
    item = Item.objects.get(external_id=reviewed["ids"]["adjudicated"], source=reviewed["source"])
    pair = ReviewTask.objects.filter(item=item, kind__in=["review", "double"])
    assert pair.count() == 2 and len({t.round for t in pair}) == 1 and all(t.paired for t in pair)
    adjudication = ReviewTask.objects.get(item=item, kind="adjudication")
    assert adjudication.parent_id in {t.pk for t in pair}


@pytest.mark.parametrize("portable", [False, True], ids=["copy", "orm"])
def test_agreed_only_is_pinned_by_the_snapshot(reviewed, portable):
    """The agreed-only filter reads verdicts as they stood at the cut-off: withdrawing one of the agreeing
    verdicts later changes nothing for that snapshot, and drops the item from a fresh export."""
    source = reviewed["source"]
    agreed = ExportFilters(agreed_only=True)

    def export(snapshot: Snapshot) -> bytes:
        spec = ExportSpec(source, "csv", agreed, snapshot)
        return b"".join(_python_stream(spec) if portable else stream_export(spec))

    snapshot = Snapshot.now()
    first = export(snapshot)
    assert _read("csv", first)["external_id"].tolist() == [reviewed["ids"]["agreed"]]
    item = Item.objects.get(source=source, external_id=reviewed["ids"]["agreed"])
    Verdict.objects.filter(item=item, reviewer__username="zed").update(withdrawn_at=timezone.now())
    assert export(snapshot) == first
    assert count_rows(ExportSpec(source, "csv", agreed, snapshot)) == 1
    assert _read("csv", export(Snapshot.now())).empty
