"""Writing and verifying the audit trail.

Events are chained in id order: hash = sha256(prev_hash + canonical JSON of the event). Writers take
one lock for the rest of their transaction so that chain order equals commit order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from reviewapp.core.models import AuditEvent

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the advisory lock that serialises audit writers on PostgreSQL.
_AUDIT_LOCK_KEY = 7_311_202_601


def _normalise(value: Any) -> Any:
    """What a JSON column gives back: so hashes computed before and after storage agree."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def event_digest(
    *,
    prev_hash: str,
    created_at: datetime,
    actor_id: int | None,
    actor_label: str,
    verb: str,
    object_type: str,
    object_id: str,
    before: Any,
    after: Any,
    correlation_id: str,
) -> str:
    body = _canonical(
        {
            "created_at": created_at.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor_id": actor_id,
            "actor_label": actor_label,
            "verb": verb,
            "object_type": object_type,
            "object_id": object_id,
            "before": before,
            "after": after,
            "correlation_id": correlation_id,
        }
    )
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    verb: str
    object_type: str
    object_id: str | int
    before: Any = None
    after: Any = None
    correlation_id: str = ""


def _lock_chain() -> str:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_AUDIT_LOCK_KEY])
    # On SQLite the IMMEDIATE transaction already holds the database's single write lock.
    last = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
    return last or GENESIS_HASH


def audit_record_many(*, actor: Any | None, entries: Iterable[AuditEntry]) -> list[AuditEvent]:
    """Append events in one go. Must run inside the caller's transaction so the event commits
    (or rolls back) with the change it describes."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit events must be written inside the transaction of their change")
    actor_id = getattr(actor, "pk", None)
    actor_label = getattr(actor, "get_username", lambda: "")() if actor is not None else "system"
    prev = _lock_chain()
    now = timezone.now()
    rows = []
    for entry in entries:
        before, after = _normalise(entry.before), _normalise(entry.after)
        digest = event_digest(
            prev_hash=prev,
            created_at=now,
            actor_id=actor_id,
            actor_label=actor_label,
            verb=entry.verb,
            object_type=entry.object_type,
            object_id=str(entry.object_id),
            before=before,
            after=after,
            correlation_id=entry.correlation_id,
        )
        rows.append(
            AuditEvent(
                created_at=now,
                actor_id=actor_id,
                actor_label=actor_label,
                verb=entry.verb,
                object_type=entry.object_type,
                object_id=str(entry.object_id),
                before=before,
                after=after,
                correlation_id=entry.correlation_id,
                prev_hash=prev,
                hash=digest,
            )
        )
        prev = digest
    # Ids must follow chain order: one INSERT keeps the order of the list.
    return AuditEvent.objects.bulk_create(rows, batch_size=1000)


def audit_record(
    *,
    actor: Any | None,
    verb: str,
    object_type: str,
    object_id: str | int,
    before: Any = None,
    after: Any = None,
    correlation_id: str = "",
) -> AuditEvent:
    entry = AuditEntry(verb, object_type, object_id, before, after, correlation_id)
    return audit_record_many(actor=actor, entries=[entry])[0]


@dataclass(frozen=True)
class ChainBreak:
    event_id: int
    reason: str


def audit_verify(*, chunk_size: int = 5000) -> Iterator[ChainBreak]:
    """Walk the chain in id order and yield every break (the first one is what matters)."""
    prev = GENESIS_HASH
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=chunk_size):
        if event.prev_hash != prev:
            yield ChainBreak(event.pk, "prev_hash does not match the previous event (a row was removed "
                                       "or reordered)")
        expected = event_digest(
            prev_hash=event.prev_hash,
            created_at=event.created_at,
            actor_id=event.actor_id,
            actor_label=event.actor_label,
            verb=event.verb,
            object_type=event.object_type,
            object_id=event.object_id,
            before=event.before,
            after=event.after,
            correlation_id=event.correlation_id,
        )
        if expected != event.hash:
            yield ChainBreak(event.pk, "content does not match its hash (the row was edited)")
        prev = event.hash
