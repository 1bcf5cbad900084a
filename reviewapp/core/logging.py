"""Structured logs: JSON lines carrying a correlation id, bound per HTTP request and per Celery task.

Use anywhere (one line) to tie log records to an item:

    with bind_correlation_id(item.correlation_id):
        logger.info("scored", extra={"item_id": item.pk})

or, for one record only: ``logger.info("...", extra={"correlation_id": str(item.correlation_id)})``.

How the id travels:
- HTTP: ``CorrelationIdMiddleware`` binds the ``X-Correlation-ID`` request header (or a new id) and echoes it.
- Celery: a task published while an id is bound carries it in a message header; in the worker the task
  binds, in this order, an explicit ``correlation_id`` argument, the correlation id of the one item the
  task is about (an ``item_id``/``decision_id`` argument, a one-element ``item_ids``, an action ``run_id``),
  the header, or a new id.
- Task latency and outcomes are counted in the ``observability_taskstat`` ledger table (see
  ``reviewapp.observability.ledger.task_stat_record`` for why a table and not process-local metrics).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, HttpResponse

CORRELATION_HEADER = "X-Correlation-ID"
# Celery message header; not Celery's own `correlation_id` property, which holds the task id.
TASK_HEADER = "reviewapp_correlation_id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_correlation_id: ContextVar[str | None] = ContextVar("reviewapp_correlation_id", default=None)
_task_context: ContextVar[tuple[str, str] | None] = ContextVar("reviewapp_task", default=None)

logger = logging.getLogger("reviewapp.core.logging")


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def clean_correlation_id(value: Any) -> str | None:
    """The id as text when it is safe to log and echo (bounded, no control characters), else None."""
    if value is None:
        return None
    text = str(value).strip()
    return text if _SAFE_ID.match(text) else None


def get_correlation_id() -> str | None:
    return _correlation_id.get()


@contextmanager
def bind_correlation_id(value: Any = None) -> Iterator[str]:
    """Bind ``value`` (a UUID or text; a new id when None or unusable) for the block; yields the id."""
    cid = clean_correlation_id(value) or new_correlation_id()
    token = _correlation_id.set(cid)
    try:
        yield cid
    finally:
        _correlation_id.reset(token)


# --- Formatting -------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _record_correlation_id(record: logging.LogRecord) -> str | None:
    """The record's own id (``extra=``), the bound one, or the id of the request the record is about:
    Django logs 4xx/5xx responses after the middleware has returned, passing the request along."""
    cid = getattr(record, "correlation_id", None)
    if cid and cid != "-":
        return str(cid)
    return get_correlation_id() or getattr(getattr(record, "request", None), "correlation_id", None)


class CorrelationIdFilter(logging.Filter):
    """Puts ``correlation_id`` on every record (for plain text formats such as ``%(correlation_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = _record_correlation_id(record) or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, correlation id, task, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data["correlation_id"] = _record_correlation_id(record)
        task = _task_context.get()
        if task is not None:
            data["task"], data["task_id"] = task
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in data and key != "correlation_id":
                data[key] = value
        if record.exc_info:
            data["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        data["process"] = record.process
        return json.dumps(data, default=str, ensure_ascii=False)


# --- HTTP -------------------------------------------------------------------------------------------


class CorrelationIdMiddleware:
    """Binds one correlation id per request (the caller's ``X-Correlation-ID`` when safe, else new)
    and returns it in the response header, so a client can quote it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with bind_correlation_id(request.headers.get(CORRELATION_HEADER)) as cid:
            request.correlation_id = cid  # type: ignore[attr-defined]
            response = self.get_response(request)
        response.headers[CORRELATION_HEADER] = cid
        return response


# --- Celery -----------------------------------------------------------------------------------------

# Per task id (one worker process runs one task at a time per thread): the tokens to undo and the start.
_running: dict[str, tuple[Token, Token, float]] = {}


def _bound_arguments(task: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    try:
        return dict(inspect.signature(task.run).bind_partial(*(args or ()), **(kwargs or {})).arguments)
    except (TypeError, ValueError):
        return dict(kwargs or {})


def _item_correlation_id(task_name: str, arguments: dict[str, Any]) -> str | None:
    """The correlation id of the one item a task is about, read from the ledger (one indexed query)."""
    from django.db import DatabaseError

    try:
        from actions.models import ActionRun
        from reviewapp.ingest.models import Item
        from reviewapp.review.models import Decision

        value: Any = None
        if isinstance(arguments.get("item_id"), int):
            value = Item.objects.filter(pk=arguments["item_id"]).values_list("correlation_id", flat=True).first()
        elif isinstance(arguments.get("item_ids"), list | tuple) and len(arguments["item_ids"]) == 1:
            value = Item.objects.filter(pk=arguments["item_ids"][0]).values_list("correlation_id", flat=True).first()
        elif isinstance(arguments.get("decision_id"), int):
            value = (Decision.objects.filter(pk=arguments["decision_id"])
                     .values_list("item__correlation_id", flat=True).first())
        elif task_name.startswith("actions.") and isinstance(arguments.get("run_id"), int):
            value = (ActionRun.objects.filter(pk=arguments["run_id"])
                     .values_list("decision__item__correlation_id", flat=True).first())
        return clean_correlation_id(value)
    except DatabaseError:
        # Logging context must never fail a task; the task itself will meet the database error.
        logger.warning("could not read the correlation id for %s", task_name, exc_info=True)
        return None


def task_correlation_id(task: Any, args: Any, kwargs: Any) -> str:
    """Which correlation id a task run binds (see the module docstring for the order)."""
    arguments = _bound_arguments(task, args, kwargs)
    explicit = clean_correlation_id(arguments.get("correlation_id") or (kwargs or {}).get("correlation_id"))
    if explicit:
        return explicit
    from_item = _item_correlation_id(getattr(task, "name", "") or "", arguments)
    if from_item:
        return from_item
    request = getattr(task, "request", None)
    header = getattr(request, TASK_HEADER, None) if request is not None else None
    if header is None and request is not None and isinstance(getattr(request, "headers", None), dict):
        header = request.headers.get(TASK_HEADER)
    return clean_correlation_id(header) or new_correlation_id()


def _is_our_task(name: str | None) -> bool:
    return bool(name) and not str(name).startswith("celery.")


def on_before_task_publish(sender: Any = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Carry the bound correlation id to the task being published (web request -> task -> subtask)."""
    cid = get_correlation_id()
    if cid and headers is not None and TASK_HEADER not in headers:
        headers[TASK_HEADER] = cid


def on_task_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, args: Any = None,
                   kwargs: Any = None, **extra: Any) -> None:
    if task is None or task_id is None:
        return
    cid = task_correlation_id(task, args, kwargs)
    _running[task_id] = (_correlation_id.set(cid), _task_context.set((task.name, task_id)), time.monotonic())


def on_task_failure(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
                    **extra: Any) -> None:
    # Runs inside the task's context, so the record carries its correlation id.
    logger.error("task failed: %s", getattr(sender, "name", "?"),
                 extra={"exception": exception.__class__.__name__ if exception else None, "task_id": task_id})


def on_task_postrun(sender: Any = None, task_id: str | None = None, task: Any = None, state: str | None = None,
                    **extra: Any) -> None:
    entry = _running.pop(task_id or "", None)
    if entry is None or task is None:
        return
    cid_token, task_token, started = entry
    seconds = time.monotonic() - started
    try:
        if _is_our_task(task.name):
            from reviewapp.observability.ledger import task_stat_record

            task_stat_record(task=task.name, state=state or "", seconds=seconds)
    finally:
        _task_context.reset(task_token)
        _correlation_id.reset(cid_token)


def connect_celery_signals() -> None:
    """Idempotent (dispatch uids); called from the observability app's ready()."""
    from celery import signals

    signals.before_task_publish.connect(on_before_task_publish, dispatch_uid="reviewapp.cid.publish", weak=False)
    signals.task_prerun.connect(on_task_prerun, dispatch_uid="reviewapp.cid.prerun", weak=False)
    signals.task_failure.connect(on_task_failure, dispatch_uid="reviewapp.cid.failure", weak=False)
    signals.task_postrun.connect(on_task_postrun, dispatch_uid="reviewapp.cid.postrun", weak=False)
