"""Reads for the review domain: the queue, a reviewer's claim, and everything the item view shows."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import Aggregate, Count, F, FloatField, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from reviewapp.core.roles import can
from reviewapp.ingest.models import IngestBatch, Item, Source
from reviewapp.review.models import Decision, ReviewTask, Verdict

# Strings longer than this (or with line breaks) are folded into <details> in the item view.
LONG_TEXT_CHARS = 120


SORTS = ("priority", "oldest")
QUEUE_KIND_FILTERS = {
    "": ("review", "double", "qa"),  # what analysts work: the default view
    "review": ("review", "double"),
    "qa": ("qa",),
    "escalation": ("escalation",),
    "adjudication": ("adjudication",),
    "all": ("review", "double", "qa", "escalation", "adjudication"),
}
# Live counts stop counting a (source, state) pair here and show an estimate above it (see queue_counts).
COUNT_CAP = 10_000


@dataclass(frozen=True)
class QueueFilters:
    source: Source | None = None
    label: str = ""
    min_confidence: float | None = None
    max_confidence: float | None = None
    min_age_hours: float | None = None
    batch_id: int | None = None
    kind: str = ""
    sort: str = "priority"


@dataclass
class QueuePage:
    tasks: list[ReviewTask]
    next_cursor: str | None
    cursor: str | None


def encode_cursor(task: ReviewTask, sort: str) -> str:
    key: list[Any] = [task.created_at.isoformat(), task.pk]
    if sort == "priority":
        key = [task.priority, *key]
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, sort: str) -> tuple[Any, ...] | None:
    """The sort key after which the page starts, or None for a missing or malformed cursor (page one)."""
    if not cursor:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        *head, created, pk = key
        created_at = datetime.fromisoformat(created)
        if timezone.is_naive(created_at) or not isinstance(pk, int):
            return None
        if sort == "priority":
            (priority,) = head
            return (float(priority), created_at, pk)
        return (created_at, pk) if not head else None
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        return None


def _after(qs: QuerySet[ReviewTask], key: tuple[Any, ...], sort: str) -> QuerySet[ReviewTask]:
    """Keyset condition: rows strictly after ``key`` in the sort order."""
    table = ReviewTask._meta.db_table
    columns = ["priority", "created_at", "id"] if sort == "priority" else ["created_at", "id"]
    if connection.vendor == "postgresql":
        # A row comparison is one index condition on (priority, created_at, id): no OFFSET, no re-scan.
        lhs = ", ".join(f'"{table}"."{c}"' for c in columns)
        # Table and column names are constants of this module; the values go as parameters.
        return qs.extra(where=[f"({lhs}) > ({', '.join(['%s'] * len(columns))})"], params=list(key))  # noqa: S610
    condition = Q()
    for i, column in enumerate(columns):
        condition |= Q(**{f"{c}": v for c, v in zip(columns[:i], key[:i], strict=True)}, **{f"{column}__gt": key[i]})
    return qs.filter(condition)


def queue_page(*, filters: QueueFilters, cursor: str | None = None, limit: int = 50) -> QueuePage:
    """One page of waiting tasks in the chosen order with their item and routing prediction, found by keyset
    (the sort key of the last row of the previous page), so page 1000 costs what page 1 costs."""
    qs = ReviewTask.objects.filter(state=ReviewTask.State.OPEN).select_related(
        "source", "item", "item__batch", "item__prediction"
    ).defer("item__payload", "item__last_error", "item__prediction__explanation",
            "item__prediction__probabilities", "item__prediction__alternatives", "item__prediction__prediction_set")
    qs = qs.filter(kind__in=QUEUE_KIND_FILTERS.get(filters.kind, QUEUE_KIND_FILTERS[""]))
    if filters.source is not None:
        qs = qs.filter(source=filters.source)
    if filters.label:
        qs = qs.filter(item__prediction__top_label=filters.label)
    if filters.min_confidence is not None:
        qs = qs.filter(item__prediction__confidence__gte=filters.min_confidence)
    if filters.max_confidence is not None:
        qs = qs.filter(item__prediction__confidence__lte=filters.max_confidence)
    if filters.min_age_hours:
        qs = qs.filter(created_at__lte=timezone.now() - timedelta(hours=filters.min_age_hours))
    if filters.batch_id:
        qs = qs.filter(item__batch_id=filters.batch_id)
    sort = filters.sort if filters.sort in SORTS else "priority"
    key = decode_cursor(cursor, sort)
    if key is not None:
        qs = _after(qs, key, sort)
    order = ("priority", "created_at", "id") if sort == "priority" else ("created_at", "id")
    rows = list(qs.order_by(*order)[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    return QueuePage(tasks=rows, next_cursor=encode_cursor(rows[-1], sort) if more and rows else None,
                     cursor=cursor if key is not None else None)


@dataclass(frozen=True)
class LiveCount:
    """A live count: exact up to COUNT_CAP, else the planner's estimate (``exact`` False)."""

    n: int
    exact: bool = True

    @property
    def display(self) -> str:
        if self.exact:
            return f"{self.n:,}"
        return f"≈{self.n / 1_000_000:.1f}M" if self.n >= 1_000_000 else f"≈{self.n:,}"


@dataclass
class QueueCounts:
    states: dict[str, LiveCount]
    waiting: dict[str, LiveCount]  # open tasks per kind
    claimed: LiveCount


# Rows a sampled estimate reads, whatever the table's size; estimates are reused for a short while.
ESTIMATE_SAMPLE_ROWS = 50_000
ESTIMATE_TTL_SECONDS = 30


def _estimate(table: str, where: str, params: list[Any]) -> int:
    """Rows matching ``where``, estimated from a block sample of about ESTIMATE_SAMPLE_ROWS rows. The
    planner's own estimate assumes source and state independent and was off by 2x at 1M rows."""
    key = "review:estimate:" + hashlib.sha256(f"{table}|{where}|{params}".encode()).hexdigest()
    cached = cache.get(key)
    if cached is not None:
        return int(cached)
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
        total = max(float(row[0]) if row else 0.0, 1.0)
        percent = min(100.0, ESTIMATE_SAMPLE_ROWS / total * 100)
        cursor.execute(f"SELECT count(*) FROM {table} t TABLESAMPLE SYSTEM (%s) WHERE {where}",  # noqa: S608
                       [percent, *params])
        sampled = cursor.fetchone()[0]
    estimate = round(sampled * 100 / percent)
    cache.set(key, estimate, ESTIMATE_TTL_SECONDS)
    return estimate


def _capped_counts_pg(*, table: str, column: str, values: list[str], where: str, source_id: int | None,
                      cap: int) -> dict[str, LiveCount]:
    """Per value of ``column``: one statement that counts at most cap+1 rows per (source, value), each a
    bounded index scan, so the cost does not grow with the table. Past the cap, the planner's estimate."""
    sql = f"""
        SELECT v.value, COALESCE(SUM(c.n), 0)::bigint, COALESCE(BOOL_OR(c.n > %s), false)
        FROM unnest(%s::text[]) AS v(value)
        CROSS JOIN (SELECT id FROM ingest_source WHERE %s::bigint IS NULL OR id = %s::bigint) AS src
        CROSS JOIN LATERAL (
            SELECT count(*) AS n FROM (
                SELECT 1 FROM {table} t WHERE t.source_id = src.id AND t.{column} = v.value {where} LIMIT %s
            ) AS capped
        ) AS c
        GROUP BY v.value"""  # noqa: S608 (table, column and where are constants of this module)
    with connection.cursor() as cursor:
        cursor.execute(sql, [cap, values, source_id, source_id, cap + 1])
        rows = {value: (int(n), bool(over)) for value, n, over in cursor.fetchall()}
    out: dict[str, LiveCount] = {}
    for value in values:
        n, over = rows.get(value, (0, False))
        if over:
            source_cond = "t.source_id = %s AND " if source_id is not None else ""
            params = ([source_id] if source_id is not None else []) + [value]
            estimate = _estimate(table, f"{source_cond}t.{column} = %s {where}", params)
            out[value] = LiveCount(max(estimate, n), exact=False)
        else:
            out[value] = LiveCount(n)
    return out


def queue_counts(*, source: Source | None = None, cap: int = COUNT_CAP) -> QueueCounts:
    """Items per state and waiting tasks per kind, for the live counts on the queue page.

    On PostgreSQL two statements of bounded cost (see _capped_counts_pg); elsewhere two grouped queries."""
    states = list(Item.State.values)
    kinds = list(ReviewTask.Kind.values)
    if connection.vendor == "postgresql":
        source_id = source.pk if source is not None else None
        state_counts = _capped_counts_pg(table=Item._meta.db_table, column="state", values=states, where="",
                                         source_id=source_id, cap=cap)
        open_counts = _capped_counts_pg(table=ReviewTask._meta.db_table, column="kind", values=kinds,
                                        where="AND t.state = 'open'", source_id=source_id, cap=cap)
        # Per kind as well, so each count is a lookup in the (source, kind, state) index.
        held = _capped_counts_pg(table=ReviewTask._meta.db_table, column="kind", values=kinds,
                                 where="AND t.state = 'claimed'", source_id=source_id, cap=cap)
        claimed = LiveCount(sum(c.n for c in held.values()), exact=all(c.exact for c in held.values()))
        return QueueCounts(states=state_counts, waiting=open_counts, claimed=claimed)
    items = Item.objects.all()
    tasks = ReviewTask.objects.filter(state__in=["open", "claimed"])
    if source is not None:
        items = items.filter(source=source)
        tasks = tasks.filter(source=source)
    state_n = dict(items.values_list("state").annotate(n=Count("id")).order_by())
    task_rows = list(tasks.values_list("kind", "state").annotate(n=Count("id")).order_by())
    return QueueCounts(
        states={s: LiveCount(state_n.get(s, 0)) for s in states},
        waiting={k: LiveCount(sum(n for kind, st, n in task_rows if kind == k and st == "open")) for k in kinds},
        claimed=LiveCount(sum(n for _kind, st, n in task_rows if st == "claimed")),
    )


def recent_batches(*, source: Source | None = None, limit: int = 30) -> list[IngestBatch]:
    qs = IngestBatch.objects.order_by("-created_at", "-id")
    if source is not None:
        qs = qs.filter(source=source)
    return list(qs.only("id", "filename", "created_at", "source_id")[:limit])


def admin_queue_tasks(*, limit: int = 200) -> list[ReviewTask]:
    """Escalations and adjudications waiting or held, oldest first, for the admin queue page."""
    return list(
        ReviewTask.objects.filter(kind__in=("escalation", "adjudication"), state__in=("open", "claimed"))
        .select_related("source", "item", "claimed_by", "parent", "parent__claimed_by")
        .order_by("created_at", "id")[:limit]
    )


def last_undoable_verdict(*, user: Any) -> Verdict | None:
    """The user's latest verdict still inside the undo window (undo may still refuse it; see verdict_undo)."""
    if not getattr(user, "is_authenticated", False):
        return None
    window = timedelta(seconds=getattr(settings, "REVIEW_UNDO_SECONDS", 300))
    return (
        Verdict.objects.filter(reviewer=user, withdrawn_at__isnull=True, created_at__gte=timezone.now() - window)
        .select_related("item").order_by("-created_at", "-id").first()
    )


def sources_for_review() -> QuerySet[Source]:
    return Source.objects.order_by("slug")


def task_for_user(
    *, user: Any, item: Item | None = None, source: Source | None = None, include_expired: bool = False,
    with_item: bool = False,
) -> ReviewTask | None:
    """The live claim the user holds (on ``item`` or in ``source`` when given), or None.

    ``include_expired`` also finds a claim whose lease ran out but was not yet released: nobody
    else has it, so its holder may still renew it or record the verdict. ``with_item`` loads the item
    with what the item view needs (``ITEM_RELATIONS``) in the same query, for ``item_view_data``."""
    if not getattr(user, "is_authenticated", False):
        return None
    qs = ReviewTask.objects.filter(state=ReviewTask.State.CLAIMED, claimed_by=user)
    if not include_expired:
        qs = qs.filter(lease_expires_at__gt=timezone.now())
    if item is not None:
        qs = qs.filter(item=item)
    if source is not None:
        qs = qs.filter(source=source)
    if with_item:
        qs = qs.select_related("item", *(f"item__{name}" for name in ITEM_RELATIONS))
    return qs.order_by("claimed_at", "id").first()


@dataclass
class PayloadField:
    name: str
    title: str
    value: Any
    text: str
    is_long: bool
    kind: str
    # (text, css class, tooltip) runs when the explanation weighs words of this field; rendered escaped.
    segments: list[tuple[str, str, str]] | None = None


@dataclass
class ItemHistory:
    tasks: list[ReviewTask]
    verdicts: list[Verdict]
    hidden_verdicts: int
    decisions: list[Decision]
    action_runs: list[Any]


@dataclass
class ItemView:
    item: Item
    task: ReviewTask | None
    fields: list[PayloadField]
    labels: list[str]
    prediction: dict[str, Any] | None
    provenance: dict[str, Any]
    decision: Decision | None
    raw_json: str
    explanation: dict[str, Any] | None = None
    history: ItemHistory | None = None
    # For adjudicators on an escalation or adjudication: every answer given on the item so far.
    peer_verdicts: list[Verdict] = field(default_factory=list)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, indent=2)
    return str(value)


def field_order(*, schema: dict[str, Any], payload: dict[str, Any], id_field: str = "",
                text_fields: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Display order of payload fields. A JSONB column does not keep object key order, so the order
    comes from lists: the id field, an ``x-order`` list if the schema has one, else ``required``,
    then the other fields by name, with free-text fields last (they are the long ones)."""
    schema = schema if isinstance(schema, dict) else {}
    explicit = schema.get("x-order") or schema.get("required") or []
    head = [id_field] if id_field else []
    head += [n for n in explicit if isinstance(n, str) and n not in text_fields]
    ordered: list[str] = []
    for name in head + sorted(n for n in payload if n not in text_fields) + list(text_fields):
        if name in payload and name not in ordered:
            ordered.append(name)
    return ordered


def schema_titles(schema: dict[str, Any]) -> dict[str, str]:
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    return {str(k): str(v.get("title") or k) for k, v in properties.items() if isinstance(v, dict)}


def payload_fields(*, payload: dict[str, Any], schema: dict[str, Any], hide: set[str], id_field: str = "",
                   text_fields: list[str] | tuple[str, ...] = (),
                   token_weights: dict[str, dict[str, float]] | None = None,
                   target: str = "") -> list[PayloadField]:
    """The payload as display rows, in :func:`field_order`, titled from the schema where it says."""
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    names = field_order(schema=schema, payload=payload, id_field=id_field, text_fields=text_fields)
    rows = []
    for name in names:
        if name in hide:
            continue
        spec = properties.get(name, {}) if isinstance(properties.get(name), dict) else {}
        value = payload[name]
        text = _as_text(value)
        kind = "number" if isinstance(value, int | float) and not isinstance(value, bool) else (
            "text" if isinstance(value, str) else "json" if isinstance(value, dict | list) else "value"
        )
        weights = (token_weights or {}).get(name)
        rows.append(PayloadField(
            name=name, title=str(spec.get("title") or name), value=value, text=text,
            is_long=len(text) > LONG_TEXT_CHARS or "\n" in text, kind=kind,
            segments=highlight_tokens(text, weights, target) if weights and kind == "text" else None,
        ))
    return rows


# The text vectoriser's own token pattern (scikit-learn's default), lower-cased like its vocabulary.
WORD = re.compile(r"\b\w\w+\b")


def highlight_tokens(text: str, weights: dict[str, float], target: str = "") -> list[tuple[str, str, str]]:
    """Split ``text`` into runs; words the model weighed carry a class (toward or against ``target``)."""
    runs: list[tuple[str, str, str]] = []
    pos = 0
    for match in WORD.finditer(text):
        weight = weights.get(match.group(0).lower())
        if weight is None or weight == 0:
            continue
        if match.start() > pos:
            runs.append((text[pos:match.start()], "", ""))
        toward = weight > 0
        tip = f"{'+' if toward else '-'}{abs(weight):.3f} {'toward' if toward else 'against'} {target}".strip()
        runs.append((match.group(0), "tok-pos" if toward else "tok-neg", tip))
        pos = match.end()
    if pos < len(text):
        runs.append((text[pos:], "", ""))
    return runs


def _pairs(raw: Any) -> list[tuple[str, float]]:
    out = []
    for pair in raw if isinstance(raw, list) else []:
        if (isinstance(pair, list | tuple) and len(pair) >= 2 and isinstance(pair[1], int | float)
                and not isinstance(pair[1], bool)):
            out.append((str(pair[0]), float(pair[1])))
    return out


EXPLANATION_METHODS = {
    "linear": "each field's share of the model's log-odds",
    "occlusion": "how much the probability drops when the field is blanked",
    "integrated_gradients": "each field's integrated gradient from a neutral baseline",
}


def explanation_data(explanation: Any, *, titles: dict[str, str]) -> dict[str, Any] | None:
    """Prediction.explanation (``{"method", "target", "base", "features": [[field, value]], "tokens":
    [["field:token", value]]}``, see scoring/estimators) as bars toward and against the target label,
    and per-field word weights for highlighting. None when the model gave no explanation."""
    if not isinstance(explanation, dict):
        return None
    features = _pairs(explanation.get("features"))
    tokens = _pairs(explanation.get("tokens"))
    if not features and not tokens:
        return None
    scale = max(abs(v) for _, v in features + tokens) or 1.0

    def row(name: str, value: float, title: str) -> dict[str, Any]:
        return {"name": name, "title": title, "value": value, "pct": round(abs(value) / scale * 100, 1)}

    weights: dict[str, dict[str, float]] = {}
    token_rows = []
    for name, value in tokens:
        field_name, _, token = name.partition(":")
        token_rows.append({**row(token or name, value, token or name), "field": titles.get(field_name, field_name)})
        for word in token.lower().split():
            known = weights.setdefault(field_name, {}).get(word)
            # A bigram lends its weight to its words unless a stronger (or unigram) weight is already there.
            if known is None or (" " not in token and abs(value) >= abs(known)):
                weights[field_name][word] = value
    method = str(explanation.get("method") or "")
    return {
        "target": str(explanation.get("target") or ""),
        "method": method,
        "method_text": EXPLANATION_METHODS.get(method, method),
        "toward": [row(n, v, titles.get(n, n)) for n, v in sorted(features, key=lambda p: -p[1]) if v > 0],
        "against": [row(n, v, titles.get(n, n)) for n, v in sorted(features, key=lambda p: p[1]) if v < 0],
        "tokens": token_rows,
        "weights": weights,
    }


def _prediction_data(item: Item) -> dict[str, Any] | None:
    prediction = item.prediction
    if prediction is None:
        return None
    return {
        "id": prediction.pk,
        "label": prediction.top_label,
        "confidence": prediction.confidence,
        "confidence_pct": round(prediction.confidence * 100, 1),
        "probabilities": prediction.probabilities,
        "alternatives": [
            {"label": str(alt[0]), "probability": float(alt[1]), "pct": round(float(alt[1]) * 100, 1)}
            for alt in (prediction.alternatives or [])
            if isinstance(alt, list | tuple) and len(alt) >= 2
        ],
        "prediction_set": list(prediction.prediction_set or []),
        "explanation": prediction.explanation,
        "model_version": {
            "id": prediction.model_version.pk,
            "version": prediction.model_version.version,
            "algorithm": prediction.model_version.algorithm,
        },
    }


def item_provenance(*, item: Item, task: ReviewTask | None = None) -> dict[str, Any]:
    batch = item.batch
    prediction = item.prediction
    return {
        "source": {"slug": item.source.slug, "name": item.source.name},
        "batch": None if batch is None else {
            "id": batch.pk,
            "filename": batch.filename,
            "uploaded_by": batch.uploaded_by.get_username() if batch.uploaded_by else None,
            "created_at": batch.created_at,
        },
        "schema_version": item.schema_version.label,
        "model_version": None if prediction is None else {
            "id": prediction.model_version.pk,
            "version": prediction.model_version.version,
            "algorithm": prediction.model_version.algorithm,
        },
        "policy_version": item.policy.version if item.policy else None,
        "route_reason": item.route_reason,
        # What put this task in front of the reviewer: for QA samples that is the draw, not the route.
        "why": (task.reason if task is not None and task.reason else item.route_reason),
        "task_kind": task.get_kind_display() if task is not None else None,
        "escalation_note": task.note if task is not None and task.kind == ReviewTask.Kind.ESCALATION else "",
        "received_at": item.received_at,
    }


# What the item view shows of an item beside its own row, loaded in the same query.
ITEM_RELATIONS = (
    "source", "batch", "batch__uploaded_by", "schema_version", "prediction", "prediction__model_version", "policy",
)


def item_with_relations(*, item_id: int) -> Item:
    return Item.objects.select_related(*ITEM_RELATIONS).get(pk=item_id)


def item_history(*, item: Item, user: Any) -> ItemHistory:
    """Tasks, verdicts, decisions and action runs of the item, in four queries (three when never decided).

    Someone else's verdict is shown only to adjudicators, or once nothing on the item waits any more:
    the two reviewers of a double review must not see each other's answer."""
    from actions.selectors import action_runs_for_item

    tasks = list(ReviewTask.objects.filter(item=item).select_related("claimed_by").order_by("created_at", "id"))
    verdicts = list(Verdict.objects.filter(item=item).select_related("reviewer", "task").order_by("created_at", "id"))
    waiting = any(t.state in ("open", "claimed") for t in tasks)
    user_id = getattr(user, "pk", None)
    if user is not None and not can(user, "adjudicate") and waiting:
        shown = [v for v in verdicts if v.reviewer_id == user_id]
    else:
        shown = verdicts
    decisions = list(
        Decision.objects.filter(item=item).select_related("decided_by", "verdict").order_by("created_at", "id")
    )
    # Runs hang off decisions: an item never decided (most items in review) has none, and the runs query
    # is the widest join of the page.
    runs = list(action_runs_for_item(item_id=item.pk)) if decisions else []
    return ItemHistory(tasks=tasks, verdicts=shown, hidden_verdicts=len(verdicts) - len(shown),
                       decisions=decisions, action_runs=runs)


def item_view_data(*, item_id: int, task: ReviewTask | None = None, user: Any = None,
                   with_history: bool = True) -> ItemView:
    """Everything the item view renders, in a fixed, small number of queries (six with the history).

    A task loaded with ``task_for_user(with_item=True)`` brings its item and relations: no query for them."""
    if task is not None and task.item_id == item_id and ReviewTask.item.is_cached(task):
        item = task.item
    else:
        item = item_with_relations(item_id=item_id)
    hide = {item.source.label_field} if item.source.label_field else set()
    schema = item.schema_version.json_schema
    history = item_history(item=item, user=user) if with_history else None
    decision: Decision | None = None
    if history is not None:
        decision = next((d for d in history.decisions if d.is_current), None)
    elif task is None or task.kind not in ("review", "double"):
        # What a QA sample or an escalation is checking; a plain review item has no decision yet.
        decision = Decision.objects.filter(item=item, is_current=True).first()
    payload = {k: v for k, v in item.payload.items() if k not in hide} if isinstance(item.payload, dict) else {}
    titles = schema_titles(schema)
    prediction = _prediction_data(item)
    explanation = explanation_data(prediction["explanation"], titles=titles) if prediction else None
    peers: list[Verdict] = []
    if task is not None and task.kind in ("escalation", "adjudication") and can(user, "adjudicate"):
        if history is not None:
            peers = [v for v in history.verdicts if v.withdrawn_at is None and v.task_id != task.pk]
        else:
            peers = list(Verdict.objects.filter(item=item, withdrawn_at__isnull=True).exclude(task=task)
                         .select_related("reviewer", "task").order_by("created_at", "id"))
    return ItemView(
        item=item,
        task=task,
        fields=payload_fields(payload=payload, schema=schema, hide=hide, id_field=item.source.id_field,
                              text_fields=list(item.source.text_fields or []),
                              token_weights=explanation["weights"] if explanation else None,
                              target=explanation["target"] if explanation else ""),
        labels=list(item.source.labels),
        prediction=prediction,
        provenance=item_provenance(item=item, task=task),
        decision=decision,
        raw_json=json.dumps(payload, ensure_ascii=False, indent=2, default=str),
        explanation=explanation,
        history=history,
        peer_verdicts=peers,
    )


def similar_decisions_available() -> bool:
    """Whether the scoring area offers ``similar_decisions`` (issue 4); the item view shows the panel if so."""
    try:
        from scoring import services as scoring_services
    except ImportError:
        return False
    return hasattr(scoring_services, "similar_decisions")


def similar_decisions(*, item: Item, k: int = 5) -> list[dict[str, Any]]:
    """Past decisions like this item (item_id, external_id, label, distance), or [] where unavailable."""
    if not similar_decisions_available():
        return []
    from scoring import services as scoring_services

    rows = scoring_services.similar_decisions(item=item, k=k)
    return [r for r in rows if isinstance(r, dict)][:k]


# --- Per-analyst figures -------------------------------------------------------------------------------

@dataclass
class AnalystFigures:
    reviewer_id: int
    username: str
    items: int = 0
    median_handling_s: float | None = None
    peer_pairs: int = 0
    peer_agreement: float | None = None
    kappa: float | None = None
    final_n: int = 0
    final_agreement: float | None = None


def cohen_kappa(pairs: dict[tuple[str, str], int]) -> float | None:
    """Cohen's kappa from counts of (this analyst's label, the peer's label). None when undefined
    (no pairs, or both raters always gave one and the same label)."""
    n = sum(pairs.values())
    if not n:
        return None
    labels = {a for a, _ in pairs} | {b for _, b in pairs}
    observed = sum(c for (a, b), c in pairs.items() if a == b) / n
    mine = {lab: sum(c for (a, _), c in pairs.items() if a == lab) / n for lab in labels}
    theirs = {lab: sum(c for (_, b), c in pairs.items() if b == lab) / n for lab in labels}
    expected = sum(mine[lab] * theirs[lab] for lab in labels)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def analyst_figures(*, since: datetime | None = None, reviewer_ids: list[int] | None = None,
                    source: Source | None = None) -> list[AnalystFigures]:
    """Per analyst, over active verdicts since ``since``: items answered, median handling time, agreement
    with the other reviewer of double reviews (share and Cohen's kappa), and agreement with final
    decisions someone else made (a peer, an adjudicator, the model a QA sample confirmed or an override).
    Four grouped queries whatever the number of verdicts."""
    base = Verdict.objects.filter(withdrawn_at__isnull=True)
    if since is not None:
        base = base.filter(created_at__gte=since)
    if reviewer_ids is not None:
        base = base.filter(reviewer_id__in=reviewer_ids)
    if source is not None:
        base = base.filter(item__source=source)
    figures: dict[int, AnalystFigures] = {}
    for rid, username, n in base.values_list("reviewer_id", "reviewer__username").annotate(n=Count("id")).order_by():
        figures[rid] = AnalystFigures(reviewer_id=rid, username=username, items=n)
    if not figures:
        return []
    for rid, median in _median_handling(base).items():
        if rid in figures:
            figures[rid].median_handling_s = median / 1000.0 if median is not None else None
    peer = Verdict.objects.filter(
        item_id=OuterRef("item_id"), round=OuterRef("round"), withdrawn_at__isnull=True,
        task__kind__in=("review", "double"),
    ).exclude(reviewer_id=OuterRef("reviewer_id")).order_by("id")
    pair_rows = (
        base.filter(task__kind__in=("review", "double"))
        .annotate(peer_label=Subquery(peer.values("label")[:1]))
        .exclude(peer_label=None)
        .values_list("reviewer_id", "label", "peer_label").annotate(n=Count("id")).order_by()
    )
    pairs: dict[int, dict[tuple[str, str], int]] = {}
    for rid, label, peer_label, n in pair_rows:
        pairs.setdefault(rid, {})[(label, peer_label)] = n
    for rid, counts in pairs.items():
        total = sum(counts.values())
        figures[rid].peer_pairs = total
        figures[rid].peer_agreement = sum(c for (a, b), c in counts.items() if a == b) / total
        figures[rid].kappa = cohen_kappa(counts)
    final = Decision.objects.filter(item_id=OuterRef("item_id"), is_current=True)
    final_rows = (
        base.annotate(final_label=Subquery(final.values("label")[:1]),
                      final_by=Subquery(final.values("verdict__reviewer_id")[:1]))
        .exclude(final_label=None)
        .filter(Q(final_by__isnull=True) | ~Q(final_by=F("reviewer_id")))
        .values_list("reviewer_id").annotate(n=Count("id"), agree=Count("id", filter=Q(label=F("final_label"))))
        .order_by()
    )
    for rid, n, agree in final_rows:
        figures[rid].final_n = n
        figures[rid].final_agreement = agree / n if n else None
    return sorted(figures.values(), key=lambda f: (-f.items, f.username))


class Median(Aggregate):
    """PostgreSQL's exact median (other databases compute it in Python, see _median_handling)."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


def _median_handling(qs: QuerySet[Verdict]) -> dict[int, float | None]:
    qs = qs.filter(handling_ms__isnull=False)
    if connection.vendor == "postgresql":
        return dict(qs.values_list("reviewer_id").annotate(m=Median("handling_ms")).order_by())
    values: dict[int, list[int]] = {}
    for rid, ms in qs.values_list("reviewer_id", "handling_ms"):
        values.setdefault(rid, []).append(ms)
    return {rid: float(statistics.median(v)) for rid, v in values.items()}
