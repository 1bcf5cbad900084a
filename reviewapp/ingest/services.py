"""Writes for sources, schema versions, ingest batches and items.

The database is the ledger: a batch row exists (status ``queued``) before any worker hears of it, the
task that processes it only carries its id, and no refused file ever creates an item. On PostgreSQL
batches take the bulk path (validate the whole file, then COPY it in chunk by chunk with a checkpoint;
see ``_bulk_run``); elsewhere the ordinary path writes every item of a batch in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connection, connections, transaction
from django.db.models import F
from django.utils import timezone
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from kombu.exceptions import OperationalError as BrokerError

from reviewapp.core.audit import AuditEntry, audit_record, audit_record_many
from reviewapp.core.errors import Conflict, PayloadTooLarge, ValidationFailed
from reviewapp.ingest import bulk, columnar, parsing, readers, schemas
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item, SchemaVersion, Source
from reviewapp.ingest.selectors import schema_current
from reviewapp.review.models import Decision, Label
from reviewapp.review.services import policy_create

logger = logging.getLogger(__name__)

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
# "new" would shadow the /sources/new/ page.
RESERVED_SLUGS = frozenset({"new"})
# Rows per chunk: a transaction of the bulk path, a unit of progress and of scoring fan-out.
CHUNK_ROWS = 20_000
# Tests switch this off to run the ordinary path on PostgreSQL too.
BULK_PATH = True
# Database sessions loading chunks in parallel on the bulk path (one per core pays on 2 cores: the
# database, not Python, is the slow side).
LOADERS = 2
INFER_SAMPLE_ROWS = 10_000
BULK_BATCH_SIZE = 2000
# Row errors kept per batch. Every bad row is still counted in `rejected`; quarantine keeps more
# because the stored raw rows are what the sender fixes and re-sends.
MAX_STORED_ERRORS = 1000
QUARANTINE_MAX_STORED_ERRORS = 100_000
READ_BLOCK = 1024 * 1024
# Namespace of the PostgreSQL advisory lock held while one process works on one batch.
_BATCH_LOCK_NS = 7_311_203
INITIAL_THRESHOLD = 0.95


def _user(actor: Any | None) -> Any | None:
    return actor if getattr(actor, "pk", None) else None


# --- sources and schemas -----------------------------------------------------------------------


def _schema_problems(json_schema: Any) -> list[dict[str, Any]]:
    if not isinstance(json_schema, dict):
        return [{"field": "schema", "message": "must be a JSON object (a JSON Schema)"}]
    try:
        Draft202012Validator.check_schema(json_schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        return [{"field": "schema", "message": f"not a valid JSON Schema at {where}: {exc.message}"}]
    problems = []
    if json_schema.get("type") != "object":
        problems.append({"field": "schema", "message": "the schema must have \"type\": \"object\""})
    properties = json_schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        problems.append({"field": "schema", "message": "the schema must declare the payload's \"properties\""})
    return problems


def _field_problems(
    json_schema: dict[str, Any], *, id_field: str, label_field: str, text_fields: Sequence[str]
) -> list[dict[str, Any]]:
    properties = json_schema.get("properties") if isinstance(json_schema, dict) else None
    if not isinstance(properties, dict):
        return []
    problems = []
    if not id_field:
        problems.append({"field": "id_field", "message": "is required"})
    elif id_field not in properties:
        problems.append({"field": "id_field", "message": f"{id_field!r} is not a property of the schema"})
    if label_field and label_field not in properties:
        problems.append({"field": "label_field", "message": f"{label_field!r} is not a property of the schema"})
    if label_field and label_field == id_field:
        problems.append({"field": "label_field", "message": "must differ from the id field"})
    for name in text_fields:
        if not isinstance(name, str) or name not in properties:
            problems.append({"field": "text_fields", "message": f"{name!r} is not a property of the schema"})
    return problems


def _label_problems(labels: Any) -> list[dict[str, Any]]:
    if not isinstance(labels, list | tuple) or not labels:
        return [{"field": "labels", "message": "must be a non-empty list of labels"}]
    problems = []
    seen: set[str] = set()
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            problems.append({"field": "labels", "message": "every label must be a non-empty string"})
        elif label != label.strip():
            problems.append({"field": "labels", "message": f"{label!r} has leading or trailing spaces"})
        elif len(label) > 100:
            problems.append({"field": "labels", "message": f"{label[:20]!r}… is longer than 100 characters"})
        elif label in seen:
            problems.append({"field": "labels", "message": f"{label!r} appears more than once"})
        else:
            seen.add(label)
    return problems


def source_as_dict(source: Source) -> dict[str, Any]:
    return {
        "slug": source.slug,
        "name": source.name,
        "labels": list(source.labels),
        "id_field": source.id_field,
        "label_field": source.label_field,
        "text_fields": list(source.text_fields),
    }


def source_create(
    *,
    actor: Any | None,
    slug: str,
    name: str,
    labels: list[str],
    json_schema: dict[str, Any],
    id_field: str,
    label_field: str = "",
    text_fields: Sequence[str] = (),
) -> Source:
    """Create a source with schema version 1.0 and its initial policy (0.95 for every label)."""
    errors: list[dict[str, Any]] = []
    if not isinstance(slug, str) or not SLUG_RE.match(slug):
        errors.append({"field": "slug", "message": "use 1-64 lowercase letters, digits, '-' or '_' "
                                                   "(starting and ending with a letter or digit)"})
    elif slug in RESERVED_SLUGS:
        errors.append({"field": "slug", "message": f"{slug!r} is reserved"})
    if not isinstance(name, str) or not name.strip():
        errors.append({"field": "name", "message": "is required"})
    elif len(name) > 200:
        errors.append({"field": "name", "message": "must be at most 200 characters"})
    errors += _label_problems(labels)
    schema_errors = _schema_problems(json_schema)
    errors += schema_errors
    text_fields = list(text_fields or [])
    if not schema_errors:
        errors += _field_problems(json_schema, id_field=id_field, label_field=label_field, text_fields=text_fields)
    if not errors and Source.objects.filter(slug=slug).exists():
        errors.append({"field": "slug", "message": f"a source named {slug!r} already exists"})
    if errors:
        raise ValidationFailed("The source is not valid.", errors)
    with transaction.atomic():
        try:
            with transaction.atomic():
                source = Source.objects.create(
                    slug=slug, name=name.strip(), labels=list(labels), id_field=id_field,
                    label_field=label_field or "", text_fields=text_fields, created_by=_user(actor),
                )
        except IntegrityError as exc:
            raise ValidationFailed(
                "The source is not valid.", [{"field": "slug", "message": f"a source named {slug!r} already exists"}]
            ) from exc
        version = SchemaVersion.objects.create(
            source=source, major=1, minor=0, json_schema=json_schema, comment="initial schema",
            created_by=_user(actor),
        )
        audit_record(
            actor=actor, verb="source.created", object_type="source", object_id=source.pk,
            after={**source_as_dict(source), "schema_version": version.label},
        )
        policy_create(
            source=source, actor=actor, thresholds={label: INITIAL_THRESHOLD for label in labels},
            comment="initial policy",
        )
    return source


def schema_version_create(
    *,
    actor: Any | None,
    source: Source,
    json_schema: dict[str, Any],
    comment: str = "",
    new_major: bool = False,
) -> SchemaVersion:
    """Add a schema version. Backward-compatible changes bump the minor version; a breaking change is
    refused with every breaking change listed, unless ``new_major`` starts a new major version."""
    errors = _schema_problems(json_schema)
    if not errors:
        errors = _field_problems(
            json_schema, id_field=source.id_field, label_field=source.label_field, text_fields=source.text_fields
        )
    if errors:
        raise ValidationFailed("The schema is not valid.", errors)
    with transaction.atomic():
        # Lock the source so two concurrent saves get consecutive versions.
        Source.objects.select_for_update().filter(pk=source.pk).first()
        current = schema_current(source=source)
        breaking: list[str] = []
        if current is not None:
            if current.json_schema == json_schema:
                raise ValidationFailed(
                    "The schema is identical to the current version.",
                    [{"field": "schema", "message": f"identical to version {current.label}"}],
                )
            breaking = schemas.schema_breaking_changes(current.json_schema, json_schema)
            if breaking and not new_major:
                raise ValidationFailed(
                    "The new schema is not backward compatible; start a new major version to accept it.",
                    [{"field": "schema", "message": change} for change in breaking],
                )
        if current is None:
            major, minor = 1, 0
        elif new_major:
            major, minor = current.major + 1, 0
        else:
            major, minor = current.major, current.minor + 1
        version = SchemaVersion.objects.create(
            source=source, major=major, minor=minor, json_schema=json_schema, comment=comment[:500],
            created_by=_user(actor),
        )
        audit_record(
            actor=actor, verb="schema.created", object_type="schema_version", object_id=version.pk,
            before={"version": current.label} if current else None,
            after={"source": source.slug, "version": version.label, "comment": version.comment, "breaking": breaking},
        )
    return version


# --- enqueueing ------------------------------------------------------------------------------------


def _send(name: str, kwargs: dict[str, Any]) -> bool:
    """Publish one task. A broker outage is logged, not raised: the row is already committed and the
    reconciler re-enqueues it, so an outage costs latency, never data."""
    try:
        current_app.send_task(name, kwargs=kwargs)
    except (BrokerError, OSError) as exc:
        logger.warning("broker unavailable, %s not sent (%s); the reconciler will retry", name, exc)
        return False
    return True


def enqueue_scoring(item_ids: list[int]) -> None:
    """Ask the scoring workers to score these items, in chunks of settings.SCORING_CHUNK_SIZE."""
    size = max(int(settings.SCORING_CHUNK_SIZE), 1)
    for start in range(0, len(item_ids), size):
        _send("scoring.score_items", {"item_ids": list(item_ids[start : start + size])})


def _enqueue_batch_scoring(batch_id: int) -> None:
    ids = Item.objects.filter(batch_id=batch_id, state=Item.State.RECEIVED).order_by("id").values_list("id", flat=True)
    chunk: list[int] = []
    size = max(int(settings.SCORING_CHUNK_SIZE), 1)
    for item_id in ids.iterator(chunk_size=size):
        chunk.append(item_id)
        if len(chunk) >= size:
            enqueue_scoring(chunk)
            chunk = []
    if chunk:
        enqueue_scoring(chunk)


def _enqueue_batch(batch_id: int) -> None:
    _send("ingest.process_batch", {"batch_id": batch_id})


# --- batches: submit ---------------------------------------------------------------------------


def _read_blocks(uploaded_file: Any) -> Iterator[bytes]:
    if hasattr(uploaded_file, "chunks"):
        blocks: Iterable[Any] = uploaded_file.chunks(READ_BLOCK)
    else:
        blocks = iter(lambda: uploaded_file.read(READ_BLOCK), b"")
    for block in blocks:
        if isinstance(block, str):
            block = block.encode("utf-8")
        if not block:
            return
        yield block


@dataclass
class _Stored:
    path: Path
    sha256: str
    size: int
    head: bytes


def _too_large() -> PayloadTooLarge:
    limit = int(settings.MAX_UPLOAD_BYTES)
    return PayloadTooLarge(f"The file is larger than the limit of {limit} bytes.",
                           [{"field": "file", "message": f"larger than {limit} bytes"}])


def _store_upload(uploaded_file: Any, directory: Path) -> _Stored:
    """Copy the upload next to its final place, hashing it and enforcing the size limit as it streams."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".part")
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    head = bytearray()
    limit = int(settings.MAX_UPLOAD_BYTES)
    try:
        with os.fdopen(fd, "wb") as out:
            for block in _read_blocks(uploaded_file):
                size += len(block)
                if size > limit:
                    raise _too_large()
                digest.update(block)
                out.write(block)
                if len(head) < parsing.SNIFF_BYTES:
                    head += block[: parsing.SNIFF_BYTES - len(head)]
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return _Stored(path, digest.hexdigest(), size, bytes(head))


@dataclass
class _Reading:
    """How a stored file is read: its format, text encoding, CSV delimiter and header, and notes."""

    file_format: str
    encoding: str = ""
    delimiter: str = ""
    columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def reader_options(self) -> dict[str, Any]:
        if self.file_format != "csv":
            return {}
        return {"encoding": self.encoding or "utf-8", "delimiter": self.delimiter or ",", "header": self.columns}


def _recognise(filename: str, head: bytes, *, complete: bool) -> _Reading:
    """Format, encoding and CSV dialect from the name and the first bytes (raises FileRejected)."""
    file_format = parsing.detect_format(filename, head)
    if file_format == "parquet":
        return _Reading(file_format)
    encoding = parsing.detect_encoding(head, complete=complete)
    reading = _Reading(file_format, encoding.name, notes=[encoding.note] if encoding.note else [])
    if file_format == "csv":
        dialect = parsing.sniff_csv(head, encoding=encoding.name, filename=filename, complete=complete)
        reading.delimiter, reading.columns = dialect.delimiter, dialect.columns
        if dialect.note:
            reading.notes.append(dialect.note)
    return reading


def _batch_reading(batch: IngestBatch, path: Path) -> _Reading:
    if batch.file_format != "csv" or batch.columns:
        return _Reading(batch.file_format, batch.encoding, batch.delimiter, list(batch.columns), list(batch.notes))
    # A batch queued before the reading was recorded at upload: recognise it now.
    with open(path, "rb") as fh:
        head = fh.read(parsing.SNIFF_BYTES)
    return _recognise(batch.filename, head, complete=len(head) < parsing.SNIFF_BYTES)


def _batch_with_content(source: Source, sha256: str) -> IngestBatch | None:
    return (
        IngestBatch.objects.filter(source=source, content_sha256=sha256)
        .exclude(status=IngestBatch.Status.FAILED)
        .order_by("created_at")
        .first()
    )


def batch_as_dict(batch: IngestBatch) -> dict[str, Any]:
    return {
        "source": batch.source.slug,
        "filename": batch.filename,
        "format": batch.file_format,
        "size_bytes": batch.size_bytes,
        "sha256": batch.content_sha256,
        "mode": batch.mode,
        "status": batch.status,
        "received": batch.received,
        "accepted": batch.accepted,
        "duplicates": batch.duplicates,
        "conflicts": batch.conflicts,
        "rejected": batch.rejected,
        "labeled": batch.labeled,
    }


def batch_submit(
    *,
    actor: Any | None,
    source: Source,
    uploaded_file: Any,
    mode: str = IngestBatch.Mode.ALL_OR_NOTHING,
    enqueue: bool = True,
    resend_of: IngestBatch | None = None,
) -> tuple[IngestBatch, bool]:
    """Store an uploaded file and queue it for processing.

    Returns ``(batch, True)``, or ``(earlier_batch, False)`` when the same content was already sent to
    this source (and did not fail). A file that is empty, compressed, binary, lying about its type or
    broken UTF-8 is refused here (ValidationFailed, nothing stored); one larger than
    settings.MAX_UPLOAD_BYTES is refused while it streams (PayloadTooLarge). ``resend_of`` links a
    re-send of fixed quarantined rows to the batch they came from. ``enqueue=False`` leaves the batch
    for the caller to process (the CLI does it inline); the reconciler still picks it up if nobody does.
    """
    if mode not in IngestBatch.Mode.values:
        raise ValidationFailed("Unknown mode.", [{"field": "mode", "message": f"must be one of "
                                                                             f"{', '.join(IngestBatch.Mode.values)}"}])
    if resend_of is not None and resend_of.source_id != source.pk:
        raise ValidationFailed("The re-sent batch belongs to another source.",
                               [{"field": "resend_of", "message": "not a batch of this source"}])
    filename = Path(str(getattr(uploaded_file, "name", "") or "upload")).name[:255] or "upload"
    declared = getattr(uploaded_file, "size", None)
    if isinstance(declared, int) and declared > int(settings.MAX_UPLOAD_BYTES):
        raise _too_large()
    directory = Path(settings.UPLOAD_ROOT) / source.slug
    stored = _store_upload(uploaded_file, directory)
    try:
        if stored.size == 0 or not stored.head.removeprefix(b"\xef\xbb\xbf").strip():
            raise ValidationFailed("The file is empty.", [{"field": "file", "message": "the file is empty"}])
        try:
            reading = _recognise(filename, stored.head, complete=stored.size <= len(stored.head))
        except parsing.FileRejected as exc:
            raise ValidationFailed(str(exc), [{"field": "file", "message": str(exc)}]) from exc
        earlier = _batch_with_content(source, stored.sha256)
        if earlier is not None:
            return earlier, False
        schema_version = schema_current(source=source)
        if schema_version is None:
            raise ValidationFailed("The source has no schema.", [{"field": "source", "message": "no schema"}])
        final = directory / f"{stored.sha256}.{parsing.FILE_SUFFIX[reading.file_format]}"
        os.replace(stored.path, final)
        with transaction.atomic():
            try:
                with transaction.atomic():
                    batch = IngestBatch.objects.create(
                        source=source, schema_version=schema_version, filename=filename,
                        file_format=reading.file_format,
                        stored_path=str(final.relative_to(Path(settings.UPLOAD_ROOT))), size_bytes=stored.size,
                        content_sha256=stored.sha256, mode=mode, uploaded_by=_user(actor),
                        encoding=reading.encoding, delimiter=reading.delimiter, columns=reading.columns,
                        notes=reading.notes, resend_of=resend_of,
                    )
            except IntegrityError:
                # The same file arrived twice at once; the other request created the batch.
                earlier = _batch_with_content(source, stored.sha256)
                if earlier is None:
                    raise
                return earlier, False
            audit_record(
                actor=actor, verb="batch.submitted", object_type="batch", object_id=batch.pk,
                after={**batch_as_dict(batch), "resend_of": resend_of.pk if resend_of else None},
            )
            if enqueue:
                batch_id = batch.pk
                transaction.on_commit(lambda: _enqueue_batch(batch_id))
        return batch, True
    finally:
        stored.path.unlink(missing_ok=True)


def schema_infer(*, uploaded_file: Any, max_rows: int = INFER_SAMPLE_ROWS) -> schemas.Inferred:
    """A first schema for a new source from a sample file (nothing is stored): types, enums for
    low-cardinality text, numeric ranges, required fields, and guesses for the id and label fields."""
    directory = Path(settings.UPLOAD_ROOT) / ".samples"
    stored = _store_upload(uploaded_file, directory)
    try:
        if stored.size == 0 or not stored.head.removeprefix(b"\xef\xbb\xbf").strip():
            raise ValidationFailed("The file is empty.", [{"field": "file", "message": "the file is empty"}])
        filename = Path(str(getattr(uploaded_file, "name", "") or "sample")).name
        try:
            reading = _recognise(filename, stored.head, complete=stored.size <= len(stored.head))
            columns, rows = readers.read_sample(stored.path, reading.file_format, max_rows=max_rows,
                                                **reading.reader_options())
        except parsing.FileRejected as exc:
            raise ValidationFailed(str(exc), [{"field": "file", "message": str(exc)}]) from exc
        if not rows:
            raise ValidationFailed("The sample has no data rows.", [{"field": "file", "message": "no data rows"}])
        inferred = schemas.infer_schema(columns, rows=rows)
        inferred.notes = reading.notes + inferred.notes
        return inferred
    finally:
        stored.path.unlink(missing_ok=True)


# --- batches: process -------------------------------------------------------------------------------


@contextmanager
def _batch_lock(batch_id: int) -> Iterator[bool]:
    """One process per batch. On PostgreSQL a session advisory lock (released on disconnect, so a dead
    worker never holds it); SQLite serialises writers on its own."""
    if connection.vendor != "postgresql":
        yield True
        return
    key = batch_id % 2_147_483_647
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [_BATCH_LOCK_NS, key])
        acquired = bool(cursor.fetchone()[0])
    try:
        yield acquired
    finally:
        if acquired:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [_BATCH_LOCK_NS, key])
            except DatabaseError:
                logger.warning("could not release the lock of batch %s; it goes with the connection", batch_id)


class _Progress:
    """Publishes rows read so far while the batch's own transaction is still open (ordinary path).

    It writes through a second, autocommit connection (PostgreSQL only), which doubles as the batch's
    heartbeat: the reconciler leaves a batch alone while its state_changed_at keeps moving. The bulk
    path commits per chunk and publishes through its own connection; it only calls ``notify``."""

    def __init__(self, batch_id: int, callback: Callable[[int, float | None], None] | None) -> None:
        self.batch_id = batch_id
        self.callback = callback
        self._conn: Any = None
        self._last = 0.0

    def notify(self, rows: int, fraction: float | None) -> None:
        if self.callback is not None:
            self.callback(rows, fraction)

    def due(self) -> bool:
        """At most one database write per second."""
        now = time.monotonic()
        if now - self._last < 1.0:
            return False
        self._last = now
        return True

    def update(self, rows: int, fraction: float | None) -> None:
        self.notify(rows, fraction)
        if connection.vendor != "postgresql" or not self.due():
            return
        try:
            if self._conn is None:
                # Same database, separate session: these updates commit while the batch's do not.
                main = connections[DEFAULT_DB_ALIAS]
                self._conn = type(main)(main.settings_dict, DEFAULT_DB_ALIAS)
            with self._conn.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {IngestBatch._meta.db_table} SET rows_processed = %s, progress = %s, "  # noqa: S608
                    "state_changed_at = %s WHERE id = %s AND status = %s",
                    [rows, fraction, timezone.now(), self.batch_id, IngestBatch.Status.RUNNING],
                )
        except DatabaseError as exc:
            # Progress is for people watching; the batch goes on without it.
            logger.warning("progress of batch %s not published: %s", self.batch_id, exc)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _fail_locked(batch: IngestBatch, *, reason: str, actor: Any | None = None) -> None:
    now = timezone.now()
    batch.status = IngestBatch.Status.FAILED
    batch.error = reason[:5000]
    batch.finished_at = now
    batch.state_changed_at = now
    batch.phase = IngestBatch.Phase.NONE
    batch.save(update_fields=["status", "error", "finished_at", "state_changed_at", "phase"])
    audit_record(
        actor=actor, verb="batch.failed", object_type="batch", object_id=batch.pk,
        after={"reason": batch.error, "attempts": batch.attempts, "rows_loaded": batch.rows_loaded},
    )


def batch_mark_failed(*, batch_id: int, reason: str, file_error: bool = False) -> bool:
    """Mark a queued or running batch failed with its reason. Returns False if it had already finished."""
    with transaction.atomic():
        batch = IngestBatch.objects.select_for_update().filter(pk=batch_id).first()
        if batch is None or batch.status in (IngestBatch.Status.DONE, IngestBatch.Status.FAILED):
            return False
        if batch.rows_loaded:
            # Only possible when the database kept failing after validation had passed: say what is in.
            reason = (f"{reason} ({batch.rows_loaded} of {batch.total_rows or '?'} rows had been loaded and stay; "
                      "sending the file again completes it, the loaded rows count as duplicates)")
        if file_error:
            # Row 0 is the file itself: the errors list and its CSV then carry the reason too.
            BatchRowError.objects.create(batch=batch, row_number=0, field="(file)", message=reason[:5000],
                                         kind=BatchRowError.Kind.FILE)
        _fail_locked(batch, reason=reason)
    return True


def _batch_claim(batch_id: int) -> IngestBatch | None:
    with transaction.atomic():
        # of=("self",): lock the batch row only, not the source and schema rows joined in.
        batch = (
            IngestBatch.objects.select_for_update(of=("self",))
            .select_related("source", "schema_version", "uploaded_by")
            .filter(pk=batch_id).first()
        )
        if batch is None or batch.status in (IngestBatch.Status.DONE, IngestBatch.Status.FAILED):
            return None
        if batch.attempts >= int(settings.MAX_TASK_ATTEMPTS):
            # A file that kills its worker is redelivered (acks_late); the attempt count ends the loop.
            _fail_locked(batch, reason=f"gave up after {batch.attempts} attempts; the last one did not finish")
            return None
        now = timezone.now()
        batch.status = IngestBatch.Status.RUNNING
        batch.attempts += 1
        batch.started_at = batch.started_at or now
        batch.state_changed_at = now
        resuming = batch.phase == IngestBatch.Phase.LOADING
        if not resuming:
            batch.rows_processed = 0
        batch.save(update_fields=["status", "attempts", "started_at", "state_changed_at", "rows_processed"])
        audit_record(
            actor=None, verb="batch.started", object_type="batch", object_id=batch.pk,
            after={"attempt": batch.attempts, "resume_after_row": batch.rows_loaded if resuming else None},
        )
    return batch


@dataclass
class _Tally:
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    labeled: int = 0
    stored_errors: int = 0
    first_error: str = ""
    error_rows: list[BatchRowError] = field(default_factory=list)
    drift: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "rejected": self.rejected,
            "labeled": self.labeled,
        }


def _add_error(tally: _Tally, batch: IngestBatch, cap: int, *, row: int, field_name: str, message: str,
               raw: str = "", kind: str = BatchRowError.Kind.INVALID) -> None:
    if not tally.first_error:
        tally.first_error = f"row {row}, {field_name}: {message}"
    if tally.stored_errors >= cap:
        return
    tally.stored_errors += 1
    tally.error_rows.append(
        BatchRowError(batch=batch, row_number=row, field=field_name[:200], message=message, raw=raw, kind=kind)
    )


def _flush_errors(tally: _Tally) -> None:
    if tally.error_rows:
        BatchRowError.objects.bulk_create(tally.error_rows, batch_size=BULK_BATCH_SIZE)
        tally.error_rows = []


def _drift(values: dict[str, Any], properties: dict[str, Any], tally: _Tally) -> None:
    for key, value in values.items():
        if key not in properties and not parsing._is_missing(value):
            tally.drift[str(key)] += 1


@dataclass
class _Applied:
    accepted: int = 0
    labeled: int = 0
    duplicates: int = 0
    conflicts: list[tuple[parsing.CheckedRow, str]] = field(default_factory=list)


def _items_apply(
    *,
    source: Source,
    schema_version: SchemaVersion,
    batch: IngestBatch | None,
    rows: list[parsing.CheckedRow],
    actor: Any | None,
) -> _Applied:
    """Insert new items (ON CONFLICT DO NOTHING), count duplicates and conflicts, import labels."""
    out = _Applied()
    first: dict[str, parsing.CheckedRow] = {}
    for row in rows:
        earlier = first.get(row.external_id)
        if earlier is None:
            first[row.external_id] = row
        elif earlier.digest == row.digest:
            out.duplicates += 1
        else:
            out.conflicts.append((row, f"conflict: row {earlier.number} has the same {source.id_field} "
                                       f"{row.external_id!r} with a different payload"))
    existing = dict(
        Item.objects.filter(source=source, external_id__in=list(first)).values_list("external_id", "payload_sha256")
    )
    fresh: list[parsing.CheckedRow] = []
    for external_id, row in first.items():
        digest = existing.get(external_id)
        if digest is None:
            fresh.append(row)
        elif digest == row.digest:
            out.duplicates += 1
        else:
            out.conflicts.append((row, _conflict_message(source, external_id)))
    if not fresh:
        return out
    now = timezone.now()
    Item.objects.bulk_create(
        [
            Item(
                source=source, external_id=row.external_id, payload=row.payload, payload_sha256=row.digest,
                schema_version=schema_version, batch=batch,
                state=Item.State.DECIDED if row.label else Item.State.RECEIVED,
                received_at=now, state_changed_at=now,
            )
            for row in fresh
        ],
        batch_size=BULK_BATCH_SIZE,
        ignore_conflicts=True,
    )
    fresh_ids = [row.external_id for row in fresh]
    landed = dict(
        Item.objects.filter(source=source, external_id__in=fresh_ids, received_at=now, batch=batch)
        .values_list("external_id", "id")
    )
    lost = [row for row in fresh if row.external_id not in landed]
    if lost:
        # Another writer inserted some of these ids between our look-up and our insert.
        raced = dict(
            Item.objects.filter(source=source, external_id__in=[r.external_id for r in lost])
            .values_list("external_id", "payload_sha256")
        )
        for row in lost:
            if raced.get(row.external_id) == row.digest:
                out.duplicates += 1
            else:
                out.conflicts.append((row, _conflict_message(source, row.external_id)))
    out.accepted = len(landed)
    labeled = [(landed[row.external_id], row.label) for row in fresh if row.label and row.external_id in landed]
    if labeled:
        _labels_import(source=source, pairs=labeled, actor=actor, now=now)
        out.labeled = len(labeled)
    return out


def _conflict_message(source: Source, external_id: str) -> str:
    return (f"conflict: an item with {source.id_field} {external_id!r} already exists with a different payload; "
            "it was not overwritten")


def _labels_import(*, source: Source, pairs: list[tuple[int, str]], actor: Any | None, now: Any) -> None:
    user = _user(actor)
    decisions = Decision.objects.bulk_create(
        [
            Decision(item_id=item_id, label=label, origin=Decision.Origin.IMPORT, decided_by=user,
                     reason="imported label", created_at=now)
            for item_id, label in pairs
        ],
        batch_size=BULK_BATCH_SIZE,
    )
    Label.objects.bulk_create(
        [
            Label(item_id=d.item_id, source=source, label=d.label, origin=Label.Origin.IMPORT, decision=d,
                  created_by=user, created_at=now)
            for d in decisions
        ],
        batch_size=BULK_BATCH_SIZE,
    )


def _stored_file(batch: IngestBatch) -> Path:
    path = Path(batch.stored_path)
    return path if path.is_absolute() else Path(settings.UPLOAD_ROOT) / path


def batch_process(
    *, batch_id: int, on_progress: Callable[[int, float | None], None] | None = None
) -> None:
    """Validate and store a batch's rows (the body of the ``ingest.process_batch`` task).

    Idempotent: a finished batch is left alone, another process already on the batch makes this call
    return at once, and a batch interrupted while loading resumes after its last committed chunk. A
    file that cannot be read fails the batch with its reason. On PostgreSQL the bulk path runs (see
    ``_bulk_run``); elsewhere the ordinary path (``_batch_run``)."""
    with _batch_lock(batch_id) as acquired:
        if not acquired:
            logger.info("batch %s is being processed elsewhere", batch_id)
            return
        batch = _batch_claim(batch_id)
        if batch is None:
            return
        progress = _Progress(batch_id, on_progress)
        try:
            if BULK_PATH and bulk.available():
                _bulk_run(batch, progress)
            else:
                _batch_run(batch, progress)
        except parsing.FileRejected as exc:
            batch_mark_failed(batch_id=batch_id, reason=str(exc), file_error=True)
        except _Superseded as exc:
            logger.warning("batch %s was marked %s while it was processed; its work was discarded", batch_id, exc)
        finally:
            progress.close()


# --- the bulk path (PostgreSQL) ------------------------------------------------------------------------
#
# Two passes over the stored file, both streaming:
#
# 1. Validate: every row is checked (vectorised, see columnar.py) and every problem recorded, but nothing
#    is written except the errors. In all_or_nothing mode (the default) one bad row refuses the batch
#    here, so a refused file never creates an item. A file that turns out unreadable half-way (broken
#    UTF-8, an unclosed quote, a damaged Parquet page) also fails here, in either mode, before any item.
# 2. Load: the valid rows go in chunk by chunk (COPY -> staging -> one INSERT ... ON CONFLICT), each
#    chunk one transaction that also moves the batch's counters and its checkpoint (rows_loaded). Items
#    fan out to scoring as each chunk commits, so scoring starts long before the batch is done.
#
# Why not one transaction for the whole batch? Items would become visible, and scorable, only at the
# end. Why not load while validating? A bad row in the last chunk would leave the earlier chunks
# behind. Validating first costs one extra parse of the file (about a tenth of the time, the database
# being the slow part) and buys both: nothing from a refused file, and early scoring. After pass 1
# nothing about the file can fail any more; what remains is the database, and an interruption there
# resumes from the checkpoint (a chunk is all in or all out), so a batch never stays half-loaded.

VALIDATE_SHARE = 0.1  # of the progress bar


def _bulk_run(batch: IngestBatch, progress: _Progress) -> None:
    source, schema_version = batch.source, batch.schema_version
    path = _stored_file(batch)
    if not path.exists():
        raise parsing.FileRejected("The uploaded file is no longer stored on the server; send it again.")
    reading = _batch_reading(batch, path)
    checker = columnar.ColumnarChecker(
        json_schema=schema_version.json_schema, id_field=source.id_field, label_field=source.label_field,
        labels=source.labels,
    )

    def frames() -> Iterator[readers.FrameChunk]:
        return readers.iter_frames(path, batch.file_format, chunk_size=CHUNK_ROWS, id_field=source.id_field,
                                   **reading.reader_options())

    if batch.phase != IngestBatch.Phase.LOADING and not _bulk_validate(batch, checker, frames(), progress):
        return
    _bulk_load(batch, checker, frames(), progress)


def _bulk_validate(batch: IngestBatch, checker: columnar.ColumnarChecker, frames: Iterator[readers.FrameChunk],
                   progress: _Progress) -> bool:
    """Pass 1. Returns False when the batch was refused (all_or_nothing with bad rows)."""
    all_or_nothing = batch.mode == IngestBatch.Mode.ALL_OR_NOTHING
    cap = MAX_STORED_ERRORS if all_or_nothing else QUARANTINE_MAX_STORED_ERRORS
    # A retry of this pass starts clean (errors are written as they are found, to keep memory flat).
    BatchRowError.objects.filter(batch=batch).delete()
    IngestBatch.objects.filter(pk=batch.pk).update(phase=IngestBatch.Phase.VALIDATING, progress=0.0)
    tally = _Tally()
    for frame in frames:
        checked = checker.check(frame, build=False)
        tally.received += checked.received
        tally.rejected += len(checked.bad)
        tally.drift.update(checked.drift)
        for bad in checked.bad:
            for problem in bad.problems:
                _add_error(tally, batch, cap, row=bad.number, field_name=problem.field, message=problem.message,
                           raw=bad.raw)
        _flush_errors(tally)
        fraction = VALIDATE_SHARE * (frame.fraction if frame.fraction is not None else 0.5)
        progress.notify(tally.received, fraction)
        if progress.due():
            IngestBatch.objects.filter(pk=batch.pk, status=IngestBatch.Status.RUNNING).update(
                rows_processed=tally.received, progress=fraction, state_changed_at=timezone.now())
    with transaction.atomic():
        locked = IngestBatch.objects.select_for_update().get(pk=batch.pk)
        if locked.status != IngestBatch.Status.RUNNING:
            raise _Superseded(locked.status)
        now = timezone.now()
        locked.received = locked.rows_processed = locked.total_rows = tally.received
        locked.rejected = tally.rejected
        locked.drift = dict(tally.drift.most_common())
        locked.state_changed_at = now
        if all_or_nothing and tally.rejected:
            locked.error = (
                f"{tally.rejected} of {tally.received} rows are not valid, so nothing was stored (all-or-nothing). "
                f"First: {tally.first_error}"
            )[:5000]
            locked.status = IngestBatch.Status.FAILED
            locked.phase = IngestBatch.Phase.NONE
            locked.finished_at = now
            locked.progress = 1.0
            locked.save()
            audit_record(actor=batch.uploaded_by, verb="batch.failed", object_type="batch", object_id=locked.pk,
                         after={**tally.as_dict(), "status": locked.status, "mode": locked.mode,
                                "error": locked.error, "drift": locked.drift})
            return False
        locked.phase = IngestBatch.Phase.LOADING
        locked.progress = VALIDATE_SHARE
        locked.save()
        audit_record(actor=batch.uploaded_by, verb="batch.validated", object_type="batch", object_id=locked.pk,
                     after={"received": tally.received, "rejected": tally.rejected, "drift": locked.drift})
    batch.phase = IngestBatch.Phase.LOADING
    return True


def _bulk_load(batch: IngestBatch, checker: columnar.ColumnarChecker, frames: Iterator[readers.FrameChunk],
               progress: _Progress) -> None:
    """Pass 2: valid rows in, chunk by chunk, each chunk with its counters in one transaction. With
    LOADERS > 1 chunks load on parallel database sessions and commit in order (see bulk.Loaders);
    inside an open transaction (tests, callers' atomic blocks) there is one session, so one loader."""
    batch.refresh_from_db()
    source, actor = batch.source, batch.uploaded_by
    cap = MAX_STORED_ERRORS if batch.mode == IngestBatch.Mode.ALL_OR_NOTHING else QUARANTINE_MAX_STORED_ERRORS
    tally = _Tally(stored_errors=BatchRowError.objects.filter(batch=batch).count())
    total = max(batch.total_rows or 0, 1)
    resume_after = batch.rows_loaded
    loaders = LOADERS if not connection.in_atomic_block else 1

    def load(prepared: bulk.Prepared, turn: bulk.Turn | None = None, seq: int = 0) -> int:
        return _bulk_chunk(batch, source, actor, prepared, tally, cap, total=total, after=resume_after, turn=turn,
                           seq=seq)

    def report(last: int) -> None:
        progress.notify(last, VALIDATE_SHARE + (1 - VALIDATE_SHARE) * min(last / total, 1.0))

    with bulk.Pipeline(frames, checker, after=resume_after, window=loaders - 1) as pipeline:
        if loaders == 1:
            for prepared in pipeline:
                report(load(prepared))
        else:
            with bulk.Loaders(loaders, load) as pool:
                for prepared in pipeline:
                    pool.submit(prepared)
                    while pool.finished:
                        report(pool.finished.pop(0))
            for last in pool.finished:  # the chunks that committed after the last one was handed out
                report(last)
    with transaction.atomic():
        locked = IngestBatch.objects.select_for_update().get(pk=batch.pk)
        if locked.status != IngestBatch.Status.RUNNING:
            raise _Superseded(locked.status)
        now = timezone.now()
        locked.status = IngestBatch.Status.DONE
        locked.phase = IngestBatch.Phase.NONE
        locked.progress = 1.0
        locked.rows_loaded = locked.total_rows or locked.rows_loaded
        locked.error = ""
        locked.finished_at = locked.state_changed_at = now
        locked.save()
        audit_record(
            actor=actor, verb="batch.processed", object_type="batch", object_id=locked.pk,
            after={**{k: getattr(locked, k) for k in _Tally().as_dict()}, "status": locked.status,
                   "mode": locked.mode, "error": "", "drift": locked.drift},
        )
        if locked.attempts > 1 and locked.accepted > locked.labeled:
            # An earlier attempt may have committed chunks whose scoring messages never left.
            batch_id = locked.pk
            transaction.on_commit(lambda: _enqueue_batch_scoring(batch_id))


def _bulk_chunk(batch: IngestBatch, source: Source, actor: Any | None, prepared: bulk.Prepared, tally: _Tally,
                cap: int, *, total: int, after: int, turn: bulk.Turn | None = None, seq: int = 0) -> int:
    """One chunk: stage, insert, import labels, classify the rest, count, checkpoint, audit."""
    frame, checked = prepared.frame, prepared.checked
    index_of = dict(zip(checked.good.numbers, checked.good_index, strict=True))
    now = timezone.now()
    with transaction.atomic():
        landed = bulk.load(prepared=prepared, batch_id=batch.pk, source_id=source.pk,
                           schema_version_id=batch.schema_version_id, actor_id=batch.uploaded_by_id, now=now)
        repeats = [r for r in checked.repeats if r.number > after]
        duplicates = landed.duplicates(prepared.staged) + sum(r.same_payload for r in repeats)
        conflicts = len(landed.conflicts) + sum(not r.same_payload for r in repeats)
        if conflicts:
            with tally.lock:  # loaders share the error cap
                for number, external_id, same_batch in landed.conflicts:
                    message = (f"conflict: an earlier row of this file has the same {source.id_field} "
                               f"{external_id!r} with a different payload" if same_batch
                               else _conflict_message(source, external_id))
                    _add_error(tally, batch, cap, row=number, field_name=source.id_field, message=message,
                               raw=frame.raw(index_of[number]), kind=BatchRowError.Kind.CONFLICT)
                for repeat in repeats:
                    if not repeat.same_payload:
                        _add_error(tally, batch, cap, row=repeat.number, field_name=source.id_field,
                                   message=f"conflict: row {repeat.first_number} has the same {source.id_field} "
                                           f"{repeat.external_id!r} with a different payload",
                                   raw=frame.raw(repeat.index), kind=BatchRowError.Kind.CONFLICT)
                _flush_errors(tally)
        if turn is not None:
            turn.wait(seq)  # from here on: shared rows (the batch's counters, the audit trail), in order
        last = frame.last_number
        loaded_ok = bulk.batch_update(batch_id=batch.pk, values={
            "accepted": F("accepted") + landed.inserted,
            "duplicates": F("duplicates") + duplicates,
            "conflicts": F("conflicts") + conflicts,
            "labeled": F("labeled") + landed.labeled,
            "rows_loaded": last,
            "progress": VALIDATE_SHARE + (1 - VALIDATE_SHARE) * min(last / total, 1.0),
            "state_changed_at": now,
        })
        if not loaded_ok:
            raise _Superseded("no longer running")
        audit_record(
            actor=actor, verb="batch.chunk_loaded", object_type="batch", object_id=batch.pk,
            after={"rows": [int(frame.numbers[0]) if len(frame) else last, last], "accepted": landed.inserted,
                   "duplicates": duplicates, "conflicts": conflicts, "labeled": landed.labeled},
        )
        if landed.received_ids:
            ids = landed.received_ids
            transaction.on_commit(lambda: enqueue_scoring(ids))
    return last


# --- the ordinary path (SQLite, and PostgreSQL when BULK_PATH is off) -----------------------------------


def _batch_run(batch: IngestBatch, progress: _Progress) -> None:
    """Row at a time through RowChecker and the ORM, all rows in one transaction."""
    source, schema_version = batch.source, batch.schema_version
    path = _stored_file(batch)
    if not path.exists():
        raise parsing.FileRejected("The uploaded file is no longer stored on the server; send it again.")
    reading = _batch_reading(batch, path)
    checker = parsing.RowChecker(
        json_schema=schema_version.json_schema, id_field=source.id_field, label_field=source.label_field,
        labels=source.labels,
    )
    properties = schema_version.json_schema.get("properties") or {}
    all_or_nothing = batch.mode == IngestBatch.Mode.ALL_OR_NOTHING
    cap = MAX_STORED_ERRORS if all_or_nothing else QUARANTINE_MAX_STORED_ERRORS
    tally = _Tally()
    refused = False
    actor = batch.uploaded_by
    chunks = readers.iter_rows(path, batch.file_format, chunk_size=CHUNK_ROWS, id_field=source.id_field,
                               **reading.reader_options())
    with transaction.atomic():
        clean = transaction.savepoint()
        for rows, columns, fraction in chunks:
            good: list[parsing.CheckedRow] = []
            bad: list[tuple[parsing.Row, list[parsing.RowProblem]]] = []
            raws: dict[int, str] = {}
            for row in rows:
                if row.values is None:
                    bad.append((row, [parsing.RowProblem("(row)" if batch.file_format == "csv" else "(root)",
                                                         row.error)]))
                    continue
                _drift(row.values, properties, tally)
                checked, problems = checker.check(row.number, row.values)
                if checked is not None:
                    good.append(checked)
                    raws[row.number] = parsing.raw_text(row, columns, batch.file_format, reading.delimiter)
                else:
                    bad.append((row, problems))
            tally.received += len(rows)
            if bad and all_or_nothing and not refused:
                # One bad row refuses the batch: undo what earlier chunks wrote, keep reading for errors.
                refused = True
                transaction.savepoint_rollback(clean)
                tally.accepted = tally.labeled = tally.duplicates = tally.conflicts = 0
                tally.stored_errors = 0
                tally.error_rows = []
            tally.rejected += len(bad)
            for row, problems in bad:
                raw = parsing.raw_text(row, columns, batch.file_format, reading.delimiter)
                for problem in problems:
                    _add_error(tally, batch, cap, row=row.number, field_name=problem.field, message=problem.message,
                               raw=raw)
            if not refused and good:
                applied = _items_apply(
                    source=source, schema_version=schema_version, batch=batch, rows=good, actor=actor
                )
                tally.accepted += applied.accepted
                tally.labeled += applied.labeled
                tally.duplicates += applied.duplicates
                tally.conflicts += len(applied.conflicts)
                for row, message in applied.conflicts:
                    _add_error(tally, batch, cap, row=row.number, field_name=source.id_field, message=message,
                               raw=raws.get(row.number, ""), kind=BatchRowError.Kind.CONFLICT)
            _flush_errors(tally)
            progress.update(tally.received, fraction)
        _batch_finish(batch, tally, refused=refused, actor=actor)


def _batch_finish(batch: IngestBatch, tally: _Tally, *, refused: bool, actor: Any | None) -> None:
    locked = IngestBatch.objects.select_for_update().get(pk=batch.pk)
    if locked.status != IngestBatch.Status.RUNNING:
        # The reconciler gave up on this batch meanwhile; its verdict stands and nothing here is kept.
        raise _Superseded(locked.status)
    now = timezone.now()
    for name, value in tally.as_dict().items():
        setattr(locked, name, value)
    locked.rows_processed = locked.total_rows = tally.received
    locked.drift = dict(tally.drift.most_common())
    locked.finished_at = now
    locked.state_changed_at = now
    locked.progress = 1.0
    if refused:
        locked.status = IngestBatch.Status.FAILED
        locked.error = (
            f"{tally.rejected} of {tally.received} rows are not valid, so nothing was stored (all-or-nothing). "
            f"First: {tally.first_error}"
        )[:5000]
        verb = "batch.failed"
    else:
        locked.status = IngestBatch.Status.DONE
        locked.rows_loaded = tally.received
        locked.error = ""
        verb = "batch.processed"
    locked.save()
    audit_record(
        actor=actor, verb=verb, object_type="batch", object_id=locked.pk,
        after={**tally.as_dict(), "status": locked.status, "mode": locked.mode, "error": locked.error,
               "drift": locked.drift},
    )
    if locked.status == IngestBatch.Status.DONE and tally.accepted > tally.labeled:
        batch_id = locked.pk
        transaction.on_commit(lambda: _enqueue_batch_scoring(batch_id))


class _Superseded(Exception):
    pass


# --- single items ----------------------------------------------------------------------------------


def item_submit(*, actor: Any | None, source: Source, payload: dict[str, Any]) -> tuple[Item, bool]:
    """Receive one item. The same external id with the same payload returns the existing item
    (created False); with a different payload it is a Conflict and nothing changes."""
    if not isinstance(payload, dict):
        raise ValidationFailed("The item must be a JSON object.", [{"field": "(root)", "message": "not an object"}])
    schema_version = schema_current(source=source)
    if schema_version is None:
        raise ValidationFailed("The source has no schema.", [{"field": "source", "message": "no schema"}])
    checker = parsing.RowChecker(
        json_schema=schema_version.json_schema, id_field=source.id_field, label_field=source.label_field,
        labels=source.labels,
    )
    row, problems = checker.check(1, payload)
    if row is None:
        raise ValidationFailed(
            "The item does not match the source's schema.",
            [{"field": p.field, "message": p.message} for p in problems],
        )
    with transaction.atomic():
        applied = _items_apply(source=source, schema_version=schema_version, batch=None, rows=[row], actor=actor)
        item = Item.objects.get(source=source, external_id=row.external_id)
        if applied.conflicts:
            raise Conflict(
                f"An item with {source.id_field} {row.external_id!r} already exists with a different payload; "
                "it was not overwritten.",
                [{"field": source.id_field, "message": "exists with a different payload", "id": item.pk}],
            )
        if not applied.accepted:
            return item, False
        audit_record(
            actor=actor, verb="item.received", object_type="item", object_id=item.pk,
            after={"source": source.slug, "external_id": item.external_id, "state": item.state,
                   "label": row.label, "schema_version": schema_version.label},
        )
        if item.state == Item.State.RECEIVED:
            item_id = item.pk
            transaction.on_commit(lambda: enqueue_scoring([item_id]))
    return item, True


# --- reconciliation --------------------------------------------------------------------------------


def batches_reconcile() -> int:
    """Re-enqueue batches stuck in queued/running past settings.RECONCILE_STUCK_SECONDS; fail those
    that used up settings.MAX_TASK_ATTEMPTS. Returns how many batches it touched."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=int(settings.RECONCILE_STUCK_SECONDS))
    requeue: list[int] = []
    entries: list[AuditEntry] = []
    with transaction.atomic():
        stuck = list(
            IngestBatch.objects.select_for_update(skip_locked=True)
            .filter(status__in=[IngestBatch.Status.QUEUED, IngestBatch.Status.RUNNING], state_changed_at__lt=cutoff)
            .order_by("state_changed_at")[:200]
        )
        for batch in stuck:
            if batch.attempts >= int(settings.MAX_TASK_ATTEMPTS):
                reason = f"gave up after {batch.attempts} attempts; the batch kept getting stuck ({batch.status})"
                batch.status = IngestBatch.Status.FAILED
                batch.error = reason
                batch.finished_at = now
                entries.append(AuditEntry("batch.failed", "batch", batch.pk, after={"reason": reason}))
            else:
                requeue.append(batch.pk)
                entries.append(AuditEntry("batch.requeued", "batch", batch.pk,
                                          after={"status": batch.status, "attempts": batch.attempts}))
            batch.state_changed_at = now
            batch.save(update_fields=["status", "error", "finished_at", "state_changed_at"])
        if entries:
            audit_record_many(actor=None, entries=entries)
        if requeue:
            transaction.on_commit(lambda: _enqueue_batches(requeue))
    return len(stuck)


def _enqueue_batches(batch_ids: list[int]) -> None:
    for batch_id in batch_ids:
        _enqueue_batch(batch_id)
