"""JSON-lines logs with a correlation id: binding, the HTTP middleware, Celery hooks and the task ledger."""

from __future__ import annotations

import io
import json
import logging
import uuid
from types import SimpleNamespace

import pytest
from celery import shared_task
from django.utils import timezone

from reviewapp.core import logging as rlog
from reviewapp.observability.models import TaskStat
from reviewapp.observability.services import task_stat_record
from tests.factories import make_payments_source
from tests.observability.helpers import build_sequence


@pytest.fixture
def json_log():
    """A JSON-lines handler on the root logger; yields a function returning the parsed records."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(rlog.JsonFormatter())
    handler.addFilter(rlog.CorrelationIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_bound_id_reaches_records_of_any_module(json_log):
    item_cid = uuid.uuid4()
    with rlog.bind_correlation_id(item_cid) as cid:
        logging.getLogger("scoring.services").info("scored %s items", 3, extra={"item_id": 7})
        with rlog.bind_correlation_id("inner-1"):
            logging.getLogger("actions").warning("nested")
        logging.getLogger("x").info("back")
    logging.getLogger("x").info("unbound")
    records = json_log()
    assert cid == str(item_cid)
    assert records[0]["correlation_id"] == str(item_cid) and records[0]["message"] == "scored 3 items"
    assert records[0]["item_id"] == 7 and records[0]["logger"] == "scoring.services" and records[0]["level"] == "INFO"
    assert records[1]["correlation_id"] == "inner-1"
    assert records[2]["correlation_id"] == str(item_cid)
    assert records[3]["correlation_id"] is None


def test_extra_correlation_id_for_one_record_and_exceptions(json_log):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"correlation_id": "abc-1"})
    (record,) = json_log()
    assert record["correlation_id"] == "abc-1" and "ValueError: boom" in record["exc"]


def test_unsafe_ids_are_replaced():
    with rlog.bind_correlation_id("bad id\nwith newline") as cid:
        assert len(cid) == 32 and "\n" not in cid
    with rlog.bind_correlation_id("x" * 65) as cid:
        assert cid != "x" * 65


@pytest.mark.django_db
def test_middleware_binds_and_echoes_the_header(client, json_log, admin_user):
    client.force_login(admin_user)
    response = client.get("/healthz", HTTP_X_CORRELATION_ID="req-123")
    assert response["X-Correlation-ID"] == "req-123"
    fresh = client.get("/healthz")
    assert len(fresh["X-Correlation-ID"]) == 32
    # A 404 is logged by Django's request logger inside the request: the record carries the id.
    client.get("/no-such-page/", HTTP_X_CORRELATION_ID="req-404")
    assert any(r["correlation_id"] == "req-404" and r["logger"] == "django.request" for r in json_log())


@shared_task(name="tests.observability.about_item")
def about_item(item_id: int, correlation_id: str | None = None) -> None:
    logging.getLogger("tests").info("working on %s", item_id)


@shared_task(name="tests.observability.about_run")
def about_run(run_id: int) -> None:
    return None


def _task_with_header(task, header: str | None, name: str | None = None):
    request = SimpleNamespace(**({rlog.TASK_HEADER: header} if header else {}))
    return SimpleNamespace(name=name or task.name, run=task.run, request=request)


@pytest.mark.django_db
def test_task_correlation_id_resolution():
    seq = build_sequence(now=timezone.now())
    item = seq.items["i3"]
    # An explicit argument wins.
    assert rlog.task_correlation_id(about_item, [item.pk], {"correlation_id": "explicit-1"}) == "explicit-1"
    # A task about one item binds that item's id, positional or keyword, over the publisher's header.
    task = _task_with_header(about_item, "from-request")
    assert rlog.task_correlation_id(task, [item.pk], {}) == str(item.correlation_id)
    assert rlog.task_correlation_id(task, [], {"item_id": item.pk}) == str(item.correlation_id)
    # An action run (a run_id of an actions.* task) resolves to its decision's item.
    run = seq.decisions["d3"].action_runs.get()
    deliver = _task_with_header(about_run, None, name="actions.deliver_run")
    assert rlog.task_correlation_id(deliver, [run.pk], {}) == str(item.correlation_id)
    # Otherwise the header from the publisher, else a new id.
    unknown = _task_with_header(about_item, "from-request")
    assert rlog.task_correlation_id(unknown, [10**9], {}) == "from-request"
    assert len(rlog.task_correlation_id(_task_with_header(about_item, None), [10**9], {})) == 32


def test_publishing_carries_the_bound_id():
    headers: dict = {}
    with rlog.bind_correlation_id("pub-1"):
        rlog.on_before_task_publish(headers=headers)
    assert headers[rlog.TASK_HEADER] == "pub-1"
    untouched: dict = {}
    rlog.on_before_task_publish(headers=untouched)
    assert untouched == {}


@pytest.mark.django_db
def test_prerun_postrun_bind_and_count(json_log):
    source = make_payments_source(slug="logs")
    from reviewapp.ingest.models import Item

    item = Item.objects.create(source=source, external_id="l1", payload={}, payload_sha256="0" * 64,
                               schema_version=source.schema_versions.first())
    task = about_item
    rlog.on_task_prerun(task_id="t-1", task=task, args=[item.pk], kwargs={})
    task.run(item.pk)
    rlog.on_task_failure(sender=task, task_id="t-1", exception=RuntimeError("x"))
    rlog.on_task_postrun(task_id="t-1", task=task, state="FAILURE")
    records = json_log()
    assert [r["correlation_id"] for r in records] == [str(item.correlation_id)] * 2
    assert records[0]["task"] == task.name and records[0]["task_id"] == "t-1"
    assert records[1]["level"] == "ERROR" and records[1]["exception"] == "RuntimeError"
    assert rlog.get_correlation_id() is None  # reset after the run
    stat = TaskStat.objects.get(task=task.name)
    assert (stat.runs, stat.failures, stat.successes) == (1, 1, 0)


@pytest.mark.django_db
def test_task_stat_histogram_is_cumulative():
    for seconds, state in ((0.02, "SUCCESS"), (0.3, "SUCCESS"), (7.0, "RETRY"), (4000.0, "FAILURE")):
        task_stat_record(task="x.y", state=state, seconds=seconds)
    stat = TaskStat.objects.get(task="x.y")
    assert (stat.runs, stat.successes, stat.retries, stat.failures) == (4, 2, 1, 1)
    assert (stat.le_0_05, stat.le_0_5, stat.le_10, stat.le_1800) == (1, 2, 3, 3)
    assert stat.duration_sum == pytest.approx(4007.32)
