"""PostgreSQL statements of the bulk path, and the thread that prepares chunks while the database works.

One chunk goes in as: COPY into a session-local temporary staging table, one set-based
``INSERT ... SELECT ... ON CONFLICT (source_id, external_id) DO NOTHING RETURNING`` into the items,
one statement that imports the labeled rows' decisions and labels, and (only when some rows did not
land) one join that tells duplicates from conflicts by comparing payload digests. No statement is
per row. The caller owns the transaction (services.py): a chunk is all in or all out.

Temporary tables are not WAL-logged and vanish with the session, so staging costs no cleanup; they
are created on first use in each database session.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, connections

from reviewapp.ingest.columnar import Checked, ColumnarChecker
from reviewapp.ingest.models import IngestBatch, Item
from reviewapp.ingest.readers import FrameChunk
from reviewapp.review.models import Decision, Label

LOCK_TIMEOUT_SECONDS = 60
STAGE = "ingest_stage_v1"
LANDED = "ingest_landed_v1"


def available() -> bool:
    return connection.vendor == "postgresql"


@dataclass
class Prepared:
    """A checked chunk ready for the database: the COPY text of its new rows and what to report."""

    frame: FrameChunk
    checked: Checked
    copy_text: str
    staged: int
    labeled: int = 0  # staged rows that carry a label
    # Shares an id with a chunk that may still be in flight: load it only after those are done, so
    # that two open transactions never wait on each other's rows.
    overlaps: bool = False


@dataclass
class Landed:
    inserted: int
    labeled: int
    received_ids: list[int]
    conflicts: list[tuple[int, str, bool]] = field(default_factory=list)  # (row number, external id, same batch)

    def duplicates(self, staged: int) -> int:
        return staged - self.inserted - len(self.conflicts)


def _escaped(values: list[str]) -> list[str]:
    """A column's values with COPY text escapes (backslash, tab, newline, carriage return; NULL is ``\\N``).

    ``str.translate`` with a mapping looks up every character: ~50 ms per 20,000 payloads, about a third of
    this process's CPU in a bulk load. Canonical JSON rarely holds a backslash and never a raw tab or newline,
    so one scan of the joined column usually finds nothing to do; otherwise ``str.replace`` (in C) does it,
    backslash first so that the added ones are not doubled."""
    joined = "".join(values)
    if "\\" not in joined and "\t" not in joined and "\n" not in joined and "\r" not in joined:
        return values
    return [v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            for v in values]


def copy_text(checked: Checked, *, after: int = 0) -> tuple[str, int, int]:
    """The good rows of a chunk (numbered after ``after``) as COPY text, how many, and how many labeled."""
    good = checked.good
    numbers, external_ids, payloads, digests, labels = (
        good.numbers, good.external_ids, good.payloads, good.digests, good.labels)
    if after and numbers and min(numbers) <= after:  # a resumed chunk: drop the rows an earlier attempt committed
        keep = [i for i, number in enumerate(numbers) if number > after]
        numbers, external_ids, payloads, digests, labels = (
            [column[i] for i in keep] for column in (numbers, external_ids, payloads, digests, labels))
    present = [label for label in labels if label is not None]
    tags = iter(_escaped(present))
    label_text = ["\\N" if label is None else next(tags) for label in labels]
    lines = [f"{number}\t{external_id}\t{payload}\t{digest}\t{tag}\n" for number, external_id, payload, digest, tag
             in zip(numbers, _escaped(external_ids), _escaped(payloads), digests, label_text, strict=True)]
    return "".join(lines), len(lines), len(present)


def _tables(cursor: Any) -> None:
    cursor.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (n bigint NOT NULL, external_id text NOT NULL, "
        "payload text NOT NULL, digest text NOT NULL, label text)"
    )
    cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {LANDED} (id bigint NOT NULL, external_id text NOT NULL, "
                   "state text NOT NULL)")
    cursor.execute(f"TRUNCATE {STAGE}, {LANDED}")


def load(*, prepared: Prepared, batch_id: int, source_id: int, schema_version_id: int, actor_id: int | None,
         now: datetime) -> Landed:
    """Stage and insert one chunk inside the caller's transaction. Set-based; see the module docstring."""
    item, decision, label = Item._meta.db_table, Decision._meta.db_table, Label._meta.db_table
    params = {"source": source_id, "schema": schema_version_id, "batch": batch_id, "now": now, "actor": actor_id,
              "received": Item.State.RECEIVED, "decided": Item.State.DECIDED, "origin": Decision.Origin.IMPORT}
    with connection.cursor() as cursor:
        # Parallel loaders commit in order, a wait the database cannot see: should one ever sit behind a
        # lock held by a writer that waits on another loader, the statement gives up and the batch retries
        # from its checkpoint instead of hanging.
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
        _tables(cursor)
        if prepared.staged == 0:
            return Landed(0, 0, [])
        with cursor.copy(f"COPY {STAGE} (n, external_id, payload, digest, label) FROM STDIN") as copy:
            copy.write(prepared.copy_text)
        # Rows go in file order (ids follow the file); a known id is left alone: ON CONFLICT DO NOTHING.
        cursor.execute(
            f"""WITH ins AS (
                  INSERT INTO {item} (source_id, external_id, payload, payload_sha256, schema_version_id, batch_id,
                                      state, route_reason, attempts, last_error, correlation_id, received_at,
                                      state_changed_at)
                  SELECT %(source)s, s.external_id, s.payload::jsonb, s.digest, %(schema)s, %(batch)s,
                         CASE WHEN s.label IS NULL THEN %(received)s ELSE %(decided)s END, '', 0, '',
                         gen_random_uuid(), %(now)s, %(now)s
                  FROM {STAGE} s ORDER BY s.n
                  ON CONFLICT (source_id, external_id) DO NOTHING
                  RETURNING id, external_id, state)
                INSERT INTO {LANDED} (id, external_id, state) SELECT id, external_id, state FROM ins""",  # noqa: S608
            params,
        )
        inserted = cursor.rowcount
        labeled = 0
        if inserted and prepared.labeled:
            # Temporary tables have no statistics: without them the planner joins 20k x 20k rows by loop.
            cursor.execute(f"ANALYZE {STAGE}, {LANDED}")
            # Labeled history: a decision (origin import) and a training label per new item, set-based.
            cursor.execute(
                f"""WITH d AS (
                      INSERT INTO {decision} (item_id, label, origin, is_current, reason, created_at, decided_by_id)
                      SELECT l.id, s.label, %(origin)s, true, 'imported label', %(now)s, %(actor)s
                      FROM {LANDED} l JOIN {STAGE} s ON s.external_id = l.external_id
                      WHERE s.label IS NOT NULL ORDER BY l.id
                      RETURNING id, item_id, label)
                    INSERT INTO {label} (item_id, source_id, label, origin, decision_id, created_by_id, is_active,
                                         created_at)
                    SELECT item_id, %(source)s, label, %(origin)s, id, %(actor)s, true, %(now)s FROM d""",  # noqa: S608
                params,
            )
            labeled = cursor.rowcount
        received_ids: list[int] = []
        if inserted > labeled:
            cursor.execute(f"SELECT id FROM {LANDED} WHERE state = %(received)s ORDER BY id", params)  # noqa: S608
            received_ids = [row[0] for row in cursor.fetchall()]
        conflicts: list[tuple[int, str, bool]] = []
        if inserted < prepared.staged:
            # Rows that did not land hit a known id: the same digest is a duplicate, another is a conflict.
            # (A new statement: it sees what this one and concurrent, committed writers inserted.)
            cursor.execute(
                f"""SELECT s.n, s.external_id, i.batch_id IS NOT DISTINCT FROM %(batch)s
                    FROM {STAGE} s JOIN {item} i ON i.source_id = %(source)s AND i.external_id = s.external_id
                    WHERE i.payload_sha256 <> s.digest ORDER BY s.n""",  # noqa: S608
                params,
            )
            conflicts = [(int(n), ext, bool(same)) for n, ext, same in cursor.fetchall()]
        # Run the deferred foreign-key checks now, before the caller takes the audit trail's lock.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")
    return Landed(inserted, labeled, received_ids, conflicts)


def batch_update(*, batch_id: int, values: dict[str, Any]) -> bool:
    """Counters and checkpoint of a running batch, inside the chunk's transaction. False when the batch
    is no longer running (the reconciler gave up on it): the caller must roll back."""
    return bool(IngestBatch.objects.filter(pk=batch_id, status=IngestBatch.Status.RUNNING).update(**values))


# --- the producer thread --------------------------------------------------------------------------------


class _End:
    pass


class Pipeline:
    """Reads, checks and formats chunks in a thread while the caller's thread talks to PostgreSQL.

    psycopg releases the GIL while it waits for the server, so parsing the next chunk overlaps with
    the database inserting this one. The queue is short (``depth`` chunks), so memory stays flat. The
    thread never touches the database; errors in it are re-raised in the caller's thread."""

    def __init__(self, frames: Iterator[FrameChunk], checker: ColumnarChecker, *, after: int, depth: int = 2,
                 window: int = 1):
        self._frames = frames
        self._checker = checker
        self._after = after
        self._recent: deque[set[str]] = deque(maxlen=max(window, 1))
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-prepare", daemon=True)

    def __enter__(self) -> Pipeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self._frames:
                if self._stop.is_set():
                    return
                if frame.received and frame.last_number <= self._after:
                    continue  # loaded by an earlier attempt (checkpoint)
                checked = self._checker.check(frame, build=True)
                text, staged, labeled = copy_text(checked, after=self._after)
                ids = set(checked.good.external_ids)
                overlaps = any(not ids.isdisjoint(earlier) for earlier in self._recent)
                self._recent.append(ids)
                if not self._put(Prepared(frame, checked, text, staged, labeled, overlaps)):
                    return
            self._put(_End())
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._put(exc)

    def __iter__(self) -> Iterator[Prepared]:
        while True:
            item = self._queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Aborted(Exception):
    """An earlier chunk failed: this one must not commit (the checkpoint stays a contiguous prefix)."""


class Turn:
    """Commit order for chunks loaded in parallel: chunk ``seq`` may commit only after ``seq - 1``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._failed = False

    def wait(self, seq: int) -> None:
        with self._cond:
            while self._next != seq:
                if self._failed:
                    raise Aborted("an earlier chunk failed")
                self._cond.wait(timeout=1.0)

    def done(self, seq: int) -> None:
        with self._cond:
            self._next = seq + 1
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()


class Loaders:
    """Loads chunks on ``count`` threads, each with its own database session, committing in order.

    The expensive part of a chunk (COPY, INSERT with its index updates, the deferred foreign-key
    checks) runs in parallel: PostgreSQL gives each session its own process, so two loaders use both
    cores while this process mostly waits. Everything shared (the batch's counters and checkpoint,
    the audit trail) happens after ``Turn.wait``, in order; a chunk that shares ids with one in flight
    is only started once those are done. ``load(prepared, turn, seq)`` must call ``turn.wait(seq)``
    inside its transaction before touching shared rows."""

    def __init__(self, count: int, load: Callable[[Prepared, Turn, int], int]) -> None:
        self.count = count
        self._load = load
        self.turn = Turn()
        self._seq = 0
        self._pending: deque[Future[int]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="ingest-load")
        self.finished: list[int] = []  # "last row" of each committed chunk, in order

    def __enter__(self) -> Loaders:
        return self

    def _run(self, prepared: Prepared, seq: int) -> int:
        try:
            last = self._load(prepared, self.turn, seq)
        except BaseException:
            self.turn.fail()
            raise
        self.turn.done(seq)
        return last

    def _collect(self, keep: int) -> None:
        while len(self._pending) > keep:
            self.finished.append(self._pending.popleft().result())

    def submit(self, prepared: Prepared) -> None:
        self._collect(0 if prepared.overlaps else self.count - 1)
        self._pending.append(self._pool.submit(self._run, prepared, self._seq))
        self._seq += 1

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is not None:
                self.turn.fail()
            errors = []
            while self._pending:
                try:
                    self.finished.append(self._pending.popleft().result())
                except BaseException as error:  # the first one is raised below
                    errors.append(error)
            if errors and exc_type is None:
                raise errors[0]
        finally:
            # Each thread closes its own database session (one task per thread, held at a barrier).
            barrier = threading.Barrier(self.count)

            def close() -> None:
                barrier.wait(timeout=30)
                connections.close_all()

            for future in [self._pool.submit(close) for _ in range(self.count)]:
                future.result()
            self._pool.shutdown()


ProgressFn = Callable[[int, float | None], None]
