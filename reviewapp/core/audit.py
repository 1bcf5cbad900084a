"""Writing and verifying the audit trail.

The trail is ``AUDIT_CHAINS`` independent hash chains. Within a chain, events are chained in id order:
hash = sha256(prev_hash + canonical JSON of the event), prev_hash being the hash of the chain's previous
event (64 zeros for its first). A writer takes one chain's lock for the rest of its transaction, so
that within a chain id order equals commit order; it takes whichever chain is free (on PostgreSQL,
``core_audit_append`` tries them in turn, then hashes and inserts in the same round trip), so up to
``AUDIT_CHAINS`` transactions write events at once instead of queueing on one global lock.

Tamper evidence is unchanged per chain: an edited row fails its own hash, a removed or reordered row
fails the next row's prev_hash, and a row moved to another chain breaks the links of the chain it left.
As with one chain, removing a chain's newest rows leaves no break: the heads (``audit_chain_heads``) are
what to anchor outside the database. Rows from before chains existed are chain 0, which continues.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from reviewapp.core.models import AuditEvent

GENESIS_HASH = "0" * 64
# Arbitrary constant: the namespace (first key) of the chains' advisory locks on PostgreSQL.
_AUDIT_LOCK_NS = 731_120_260
DEFAULT_CHAINS = 32


def _normalise(value: Any) -> Any:
    """What a JSON column gives back: so hashes computed before and after storage agree."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def event_body(
    *,
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
    """The canonical JSON an event's hash covers (after its chain's previous hash)."""
    return _canonical(
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


def event_digest(*, prev_hash: str, **fields: Any) -> str:
    """sha256(prev_hash + body), hex; PostgreSQL's core_audit_append computes the same."""
    return hashlib.sha256((prev_hash + event_body(**fields)).encode()).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    verb: str
    object_type: str
    object_id: str | int
    before: Any = None
    after: Any = None
    correlation_id: str = ""


def chain_count() -> int:
    """How many chains writers spread over (``AUDIT_CHAINS``). Changing it is safe: verification reads
    the chains present in the table, and chains beyond a lowered count simply stop growing."""
    return max(1, min(1000, int(getattr(settings, "AUDIT_CHAINS", DEFAULT_CHAINS))))


def _actor_fields(actor: Any | None) -> tuple[int | None, str]:
    """(actor_id, actor_label) as events store them; ``None`` is the system."""
    if actor is None:
        return None, "system"
    return getattr(actor, "pk", None), getattr(actor, "get_username", lambda: "")()


def _preferred_chain(chains: int) -> int:
    """The chain this connection got last time (its events mostly stay on one chain), else a random one."""
    preferred = getattr(connection, "_audit_chain", None)
    return (random.randrange(chains) if preferred is None else preferred) % chains


def _lock_chain() -> tuple[int, str]:
    """SQLite: the IMMEDIATE transaction already holds the database's single write lock; one chain."""
    last = AuditEvent.objects.filter(chain=0).order_by("-id").values_list("hash", flat=True).first()
    return 0, last or GENESIS_HASH


def audit_record_many(*, actor: Any | None, entries: Iterable[AuditEntry]) -> list[AuditEvent]:
    """Append events in one go. Must run inside the caller's transaction so the event commits
    (or rolls back) with the change it describes."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit events must be written inside the transaction of their change")
    # On PostgreSQL a transaction keeps one chain's lock to its commit; others take other chains meanwhile.
    actor_id, actor_label = _actor_fields(actor)
    now = timezone.now()
    rows = []
    for entry in entries:
        before, after = _normalise(entry.before), _normalise(entry.after)
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
            )
        )
    if not rows:
        return rows
    if connection.vendor == "postgresql":
        return _append_postgresql(rows)
    chain, prev = _lock_chain()
    for row in rows:
        row.chain, row.prev_hash = chain, prev
        row.hash = prev = hashlib.sha256((prev + _body(row)).encode()).hexdigest()
    # Ids must follow chain order: one INSERT keeps the order of the list (and the chain lock, held to
    # commit, keeps other writers of this chain after it).
    return AuditEvent.objects.bulk_create(rows, batch_size=1000)


def _body(row: AuditEvent) -> str:
    return event_body(
        created_at=row.created_at,
        actor_id=row.actor_id,
        actor_label=row.actor_label,
        verb=row.verb,
        object_type=row.object_type,
        object_id=row.object_id,
        before=row.before,
        after=row.after,
        correlation_id=row.correlation_id,
    )


def _append_postgresql(rows: list[AuditEvent]) -> list[AuditEvent]:
    """One round trip: core_audit_append takes a free chain, reads its head, hashes each body after the
    previous hash and inserts the rows in order (ids follow chain order)."""
    chains = chain_count()
    preferred = _preferred_chain(chains)
    payload = [
        {
            "created_at": row.created_at.isoformat(),
            "actor_id": row.actor_id,
            "actor_label": row.actor_label,
            "verb": row.verb,
            "object_type": row.object_type,
            "object_id": row.object_id,
            "before": row.before,
            "after": row.after,
            "correlation_id": row.correlation_id,
            "body": _body(row),
        }
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_id, chain_id, prev, digest FROM core_audit_append(%s, %s, %s, %s::jsonb)",
            [_AUDIT_LOCK_NS, preferred, chains, json.dumps(payload, default=str)],
        )
        written = cursor.fetchall()
    for row, (pk, chain, prev, digest) in zip(rows, written, strict=True):
        row.pk, row.chain, row.prev_hash, row.hash = pk, chain, prev, digest
        row._state.adding = False
        row._state.db = connection.alias
    connection._audit_chain = rows[0].chain  # type: ignore[attr-defined]
    return rows


def audit_sql_params(
    *, actor: Any | None, verb: str, object_type: str, before: Any, after: Any, slots: Iterable[str],
    created_at: datetime,
) -> dict[str, Any]:
    """Parameters for appending one event from inside the caller's own SQL statement on PostgreSQL, when the
    event's object id and some ``after`` values (``slots``) are only known to that statement (the row it
    picks). The change and its event are then one statement: one round trip, and atomic without a
    transaction block. The statement fills the slots (see ``review.services._CLAIM_SQL``):

    - ``audit_entry``: the event as JSON (without object id, ``after`` without the slots);
    - ``audit_body``: the canonical body the hash covers, with a marker where each value goes; the marker
      (``audit_mark_<name>``, a quoted JSON string holding a random nonce, so no other text of the body can
      equal it) is replaced by the value's JSON text (``to_json(value)::text``, which for ids and plain ASCII
      words is what Python's canonical JSON writes; ``audit_verify`` re-hashes in Python and would flag any
      difference);
    - ``audit_ns``, ``audit_chain``, ``audit_chains``: ``core_audit_append``'s chain arguments."""
    if not transaction.get_connection().vendor == "postgresql":
        raise RuntimeError("audit_sql_params is for PostgreSQL statements; elsewhere use audit_record")
    nonce = uuid.uuid4().hex
    names = ["object_id", *slots]
    marks = {name: f"@@{nonce}:{name}@@" for name in names}
    before, after = _normalise(before), _normalise(after)
    actor_id, actor_label = _actor_fields(actor)
    body = event_body(created_at=created_at, actor_id=actor_id, actor_label=actor_label, verb=verb,
                      object_type=object_type, object_id=marks["object_id"], before=before,
                      after={**(after or {}), **{name: marks[name] for name in slots}}, correlation_id="")
    entry = {"created_at": created_at.isoformat(), "actor_id": actor_id, "actor_label": actor_label, "verb": verb,
             "object_type": object_type, "before": before, "after": after, "correlation_id": ""}
    chains = chain_count()
    preferred = _preferred_chain(chains)
    return {"audit_ns": _AUDIT_LOCK_NS, "audit_chain": preferred, "audit_chains": chains,
            "audit_entry": json.dumps(entry), "audit_body": body,
            **{f"audit_mark_{name}": json.dumps(mark) for name, mark in marks.items()}}


def audit_remember_chain(chain: int | None) -> None:
    """After an in-statement append: this connection prefers the chain it got next time (as
    ``_append_postgresql`` does), so one session's events mostly stay on one chain."""
    if chain is not None:
        connection._audit_chain = chain  # type: ignore[attr-defined]


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
    """Walk every chain in id order and yield every break (the first one is what matters)."""
    chain: int | None = None
    prev = GENESIS_HASH
    for event in AuditEvent.objects.order_by("chain", "id").iterator(chunk_size=chunk_size):
        if event.chain != chain:
            chain, prev = event.chain, GENESIS_HASH
        if event.prev_hash != prev:
            yield ChainBreak(event.pk, f"prev_hash does not match the previous event of chain {event.chain} "
                                       "(a row was removed, reordered or moved between chains)")
        if not event_matches(event):
            yield ChainBreak(event.pk, "content does not match its hash (the row was edited)")
        prev = event.hash


_HEADS_SQL = """
WITH RECURSIVE chains(c) AS (
    SELECT 0 UNION ALL SELECT c + 1 FROM chains WHERE c < (SELECT max(chain) FROM core_auditevent)
)
SELECT e.chain, e.id, e.hash FROM chains
JOIN core_auditevent AS e ON e.id = (SELECT max(id) FROM core_auditevent WHERE chain = chains.c)
ORDER BY e.chain
"""


def audit_chain_heads() -> list[dict[str, Any]]:
    """Each chain's newest event (id and hash): one statement, one index probe per chain."""
    with connection.cursor() as cursor:
        cursor.execute(_HEADS_SQL)
        return [{"chain": chain, "id": pk, "hash": digest} for chain, pk, digest in cursor.fetchall()]


def event_matches(event: AuditEvent) -> bool:
    """Whether the event's content still hashes (with its prev_hash) to its stored hash."""
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
    return expected == event.hash
