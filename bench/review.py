"""Review benchmark: claim-next, the item view and verdict + next item with 1M waiting items.

    python bench/review.py --items 1000000 --claims 400 --views 200 --runs 3

Uses BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/reviewapp_bench) and its own source
(slug ``bench-review``), so it shares the database with the other benches without touching their rows. The
waiting items are made once with set-based SQL (items, predictions, open review tasks) and reset at each
start (this run's claims, verdicts, decisions and labels are removed; the tasks are open again).

Measured, each as p50/p95 in milliseconds:
- claim-next (``task_claim_next``) with 1 and with 16 concurrent reviewers (threads, each its own
  database connection and user), beside the same run's bare SQL claim (one transaction: SELECT ... ORDER BY
  priority LIMIT 1 FOR UPDATE SKIP LOCKED, UPDATE, COMMIT) as a ratio (claim-next on PostgreSQL is one
  statement with its audit event, so there is no audit write left to stub out), and at 16 reviewers beside
  claim-next with the trail in one
  chain (``AUDIT_CHAINS=1``: one global lock, as before the trail was partitioned); the 16-reviewer claims
  run twice: in 16 threads of this process (they share the GIL) and in 16 forked processes (as gunicorn
  workers would), each beside the bare claim run the same way. Those are the stress case: every reviewer
  claims again the instant the last claim returns (over 1,000 claims/s on 2 cores, CPU-bound). A third
  16-reviewer scenario is people at work: each of 16 processes claims, spends ``--think-ms`` on the item
  (uniform 0.5x-1.5x, 1 s by default, a fast analyst), closes it and claims again, beside the bare claim
  run the same way;
- server time of the item view (the work page showing a held item; the read-only item page), Django's test
  client in-process, so the figure is the whole request through middleware and templates, without a socket;
- server time of verdict + next item (the htmx POST that records the verdict and renders the next item);
- the queue page (first page, a deep keyset page) and the live counts at this size.
Views are set beside the smallest signed-in request through the same client (the lease renewal: session,
user, permissions and two indexed statements). Each figure is the median over
``--runs`` runs (the machine is shared; compare ratios across runs rather than absolute figures).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DB, ensure_database, setup_django

SLUG = "bench-review"
THREADS = 16

MAKE_ITEMS = """
INSERT INTO ingest_item (source_id, external_id, payload, payload_sha256, schema_version_id, state, attempts,
                         last_error, correlation_id, received_at, state_changed_at, route_reason, policy_id)
SELECT %(source)s, 'rv-' || lpad(g::text, 9, '0'),
       jsonb_build_object('payment_id', 'rv-' || lpad(g::text, 9, '0'), 'amount', round((random() * 500)::numeric, 2),
         'currency', (ARRAY['USD','EUR','GBP'])[1 + g %% 3], 'merchant_category',
         (ARRAY['grocery','fuel','travel','electronics'])[1 + g %% 4], 'country', (ARRAY['US','GB','DE','NG'])[1 + g %% 4],
         'card_present', g %% 2 = 0, 'hour', g %% 24, 'account_age_days', g %% 2000, 'txn_count_24h', g %% 7,
         'description', (ARRAY['weekly shop','refund please','coffee, large','gift card bulk'])[1 + g %% 4]),
       md5(g::text) || md5(g::text), %(schema)s, 'queued', 0, '', gen_random_uuid(),
       now() - make_interval(secs => g), now(), '', %(policy)s
FROM generate_series(1, %(rows)s) AS g;

INSERT INTO scoring_prediction (item_id, model_version_id, probabilities, top_label, confidence, alternatives,
                                prediction_set, explanation, created_at)
SELECT i.id, %(model)s, jsonb_build_object('legit', c, 'fraud', 1 - c), 'legit', c,
       jsonb_build_array(jsonb_build_array('fraud', 1 - c)), '["legit", "fraud"]'::jsonb,
       jsonb_build_object('method', 'linear', 'target', 'legit', 'base', 0.1,
                          'features', '[["amount", 0.8], ["country", -0.3], ["description", 0.2]]'::jsonb,
                          'tokens', '[["description:shop", 0.4], ["description:refund", -0.6]]'::jsonb),
       now()
FROM (SELECT id, 0.5 + (hashtext(external_id) & 65535) / 65536.0 * 0.49 AS c
      FROM ingest_item WHERE source_id = %(source)s) AS i;

UPDATE ingest_item i SET prediction_id = p.id,
       route_reason = 'legit ' || round(p.confidence::numeric, 4) || ' below its threshold 0.99'
FROM scoring_prediction p WHERE p.item_id = i.id AND i.source_id = %(source)s;

INSERT INTO review_reviewtask (item_id, source_id, kind, round, state, priority, reason, note, created_at)
SELECT i.id, i.source_id, 'review', 1, 'open', p.confidence, i.route_reason, '', i.received_at
FROM ingest_item i JOIN scoring_prediction p ON p.id = i.prediction_id WHERE i.source_id = %(source)s;
"""

RESET = """
DELETE FROM review_label WHERE source_id = %(source)s;
UPDATE review_decision SET supersedes_id = NULL WHERE item_id IN (SELECT id FROM ingest_item WHERE source_id = %(source)s)
    AND supersedes_id IS NOT NULL;
DELETE FROM review_decision WHERE item_id IN (SELECT item_id FROM review_reviewtask WHERE source_id = %(source)s
                                                  AND state <> 'open');
DELETE FROM review_verdict WHERE task_id IN (SELECT id FROM review_reviewtask WHERE source_id = %(source)s
                                                 AND state <> 'open');
DELETE FROM review_reviewtask WHERE source_id = %(source)s AND kind <> 'review';
UPDATE review_reviewtask SET state = 'open', claimed_by_id = NULL, claimed_at = NULL, lease_expires_at = NULL,
       completed_at = NULL WHERE source_id = %(source)s AND state <> 'open';
UPDATE ingest_item SET state = 'queued' WHERE source_id = %(source)s AND state <> 'queued';
"""

BARE_CLAIM = """
UPDATE review_reviewtask SET state = 'claimed', claimed_by_id = %s, claimed_at = now(),
       lease_expires_at = now() + interval '10 minutes'
WHERE id = (SELECT id FROM review_reviewtask WHERE source_id = %s AND state = 'open'
            ORDER BY priority, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), pct(values, 0.95)


def prepare(rows: int) -> tuple[Any, list[Any]]:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from reviewapp.core.roles import Role, ensure_role_groups
    from reviewapp.ingest.models import Item, Source
    from reviewapp.review.models import Policy
    from scoring.models import ModelVersion
    from tests.factories import make_payments_source

    source = Source.objects.filter(slug=SLUG).first() or make_payments_source(slug=SLUG, thresholds={"legit": 0.99})
    policy = Policy.objects.filter(source=source).order_by("-version").first()
    model = ModelVersion.objects.filter(source=source, is_champion=True).first() or ModelVersion.objects.create(
        source=source, version=1, algorithm="bench-logreg", status=ModelVersion.Status.READY, is_champion=True)
    ensure_role_groups()
    from django.contrib.auth.models import Group

    group = Group.objects.get(name=Role.ANALYST.value)
    users = []
    for n in range(THREADS + 2):
        user, created = get_user_model().objects.get_or_create(username=f"bench-reviewer-{n}")
        if created:
            user.groups.add(group)
        users.append(user)
    params = {"source": source.pk, "schema": source.schema_versions.first().pk, "policy": policy.pk,
              "model": model.pk, "rows": rows}
    with connection.cursor() as cursor:
        cursor.execute(RESET, params)
    if Item.objects.filter(source=source).count() != rows:
        print(f"making {rows:,} waiting items ...", file=sys.stderr)
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM review_reviewtask WHERE source_id = %(source)s", params)
            cursor.execute("UPDATE ingest_item SET prediction_id = NULL WHERE source_id = %(source)s", params)
            cursor.execute("DELETE FROM scoring_prediction WHERE item_id IN "
                           "(SELECT id FROM ingest_item WHERE source_id = %(source)s)", params)
            cursor.execute("DELETE FROM ingest_item WHERE source_id = %(source)s", params)
            cursor.execute(MAKE_ITEMS, params)
    with connection.cursor() as cursor:
        # Earlier runs left dead rows behind the reset; a fresh visibility map keeps counts index-only.
        cursor.execute("VACUUM ANALYZE review_reviewtask")
        cursor.execute("VACUUM ANALYZE ingest_item")
    return source, users


def finish_task(task_id: int) -> None:
    """Take a claimed task out of the way without timing it (as if a verdict had come)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("UPDATE review_reviewtask SET state = 'done', completed_at = now() WHERE id = %s", [task_id])


# Threads share one interpreter (and its GIL): at 16 reviewers on 2 cores every claim's Python waits for
# the others'. Gunicorn serves requests from separate processes, so the same scenario also runs with one
# forked process per reviewer (``PROCESSES["on"]``).
PROCESSES = {"on": False}


def run_processes(n: int, per_thread: int, work: Callable[[int], float]) -> list[float]:
    """``work(i)`` in n forked processes, each with its own connection; timings come back on a queue."""
    import multiprocessing

    from django.db import connections

    ctx = multiprocessing.get_context("fork")
    connections.close_all()  # a child must never share the parent's socket
    barrier = ctx.Barrier(n)
    results = ctx.Queue()

    def body(i: int) -> None:
        try:
            barrier.wait()
            results.put(("ok", [work(i) for _ in range(per_thread)]))
        except BaseException as exc:  # reported by the parent
            results.put(("error", repr(exc)))
        finally:
            connections.close_all()

    procs = [ctx.Process(target=body, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    timings: list[float] = []
    errors = []
    for _ in procs:
        status, value = results.get(timeout=600)
        if status == "ok":
            timings.extend(value)
        else:
            errors.append(value)
    for p in procs:
        p.join()
    if errors:
        raise RuntimeError(errors[0])
    return timings


def run_threads(n: int, per_thread: int, work: Callable[[int], float]) -> list[float]:
    """``work(i)`` returns one timing in seconds; n threads, each with its own connection."""
    from django.db import connections

    if PROCESSES["on"]:
        return run_processes(n, per_thread, work)

    timings: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait()
            mine = [work(i) for _ in range(per_thread)]
            with lock:
                timings.extend(mine)
        except BaseException as exc:  # reported after the join
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return timings


def think(seconds: float) -> None:
    """A reviewer reading the item before the next claim: uniform between half and 1.5x ``seconds``, so
    reviewers drift apart instead of claiming in lockstep. 0 is the back-to-back stress case."""
    if seconds > 0:
        time.sleep(random.uniform(0.5 * seconds, 1.5 * seconds))


def bench_claims(source: Any, users: list[Any], n_threads: int, per_thread: int, *,
                 chains: int | None = None, think_s: float = 0.0) -> list[float]:
    """``chains=1`` writes every event to one chain, which is
    what the trail did before it was partitioned (one global lock held to commit); ``think_s`` is each
    reviewer's time on an item between claims (see ``think``)."""
    from django.conf import settings

    from reviewapp.review import services

    original_chains = getattr(settings, "AUDIT_CHAINS", None)
    if chains is not None:
        settings.AUDIT_CHAINS = chains
    try:
        def one(i: int) -> float:
            start = time.perf_counter()
            task = services.task_claim_next(user=users[i], source=source)
            elapsed = time.perf_counter() - start
            assert task is not None
            finish_task(task.pk)
            think(think_s)
            return elapsed

        return run_threads(n_threads, per_thread, one)
    finally:
        if chains is not None:
            if original_chains is None:
                del settings.AUDIT_CHAINS
            else:
                settings.AUDIT_CHAINS = original_chains


def bench_bare(source: Any, users: list[Any], n_threads: int, per_thread: int, think_s: float = 0.0) -> list[float]:
    from django.db import connection, transaction

    def one(i: int) -> float:
        start = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(BARE_CLAIM, [users[i].pk, source.pk])
            (task_id,) = cursor.fetchone()
        elapsed = time.perf_counter() - start
        finish_task(task_id)
        think(think_s)
        return elapsed

    return run_threads(n_threads, per_thread, one)


def bench_views(source: Any, user: Any, n: int) -> dict[str, list[float]]:
    from django.test import Client

    from reviewapp.review.models import ReviewTask

    client = Client()
    client.force_login(user)
    hx = {"HTTP_HX_REQUEST": "true"}
    out: dict[str, list[float]] = {"bare request (/healthz)": [], "lease renewal (minimal authed request)": [],
                                   "work page (held item)": [], "item page": [],
                                   "verdict + next": [], "queue page 1": [], "queue deep page": [],
                                   "live counts": []}

    def timed(key: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        response = call()
        out[key].append(time.perf_counter() - start)
        assert response.status_code == 200, (key, response.status_code, response.content[:300])
        return response

    client.post("/review/claim/", {"source": SLUG}, **hx)
    for _ in range(5):  # warm caches and the template loader
        client.get("/review/")
    for _ in range(n):
        task = ReviewTask.objects.filter(claimed_by=user, state="claimed").order_by("claimed_at").first()
        # The floor of any request here: the middleware stack and a response, no session, no query.
        timed("bare request (/healthz)", lambda: client.get("/healthz"))
        # The floor of a signed-in request: session, user, permissions and two indexed statements, JSON out.
        timed("lease renewal (minimal authed request)", lambda t=task: client.post(f"/review/items/{t.item_id}/lease/"))
        timed("work page (held item)", lambda: client.get("/review/"))
        timed("item page", lambda t=task: client.get(f"/review/items/{t.item_id}/"))
        timed("verdict + next", lambda t=task: client.post(
            f"/review/items/{t.item_id}/verdict/",
            {"label": "legit", "source": SLUG, "idempotency_key": uuid.uuid4().hex, "handling_ms": "1500"}, **hx))
    page = client.get("/queue/", {"source": SLUG})
    import re

    cursor = None
    for _ in range(20):  # walk 20 pages deep by keyset
        match = re.search(r'id="next-page" href="[^"]*after=([^"&]+)', page.content.decode())
        cursor = match.group(1) if match else cursor
        page = client.get("/queue/", {"source": SLUG, "after": cursor}, HTTP_HX_TARGET="queue-results", **hx)
    for _ in range(max(20, n // 5)):
        timed("queue page 1", lambda: client.get("/queue/", {"source": SLUG}))
        timed("queue deep page", lambda: client.get("/queue/", {"source": SLUG, "after": cursor},
                                                    HTTP_HX_TARGET="queue-results", **hx))
        timed("live counts", lambda: client.get("/queue/counts/", {"source": SLUG}, **hx))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--claims", type=int, default=400, help="claims per scenario (split over the threads)")
    parser.add_argument("--views", type=int, default=200, help="item views and verdicts")
    parser.add_argument("--runs", type=int, default=3, help="repeat and report the median of each figure")
    parser.add_argument("--think-ms", type=float, default=1000.0,
                        help="reviewers at work: mean time on an item between claims (uniform 0.5x-1.5x)")
    parser.add_argument("--work-claims", type=int, default=20, help="claims per reviewer at work")
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
    ensure_database(url)
    setup_django(url)
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    source, users = prepare(args.items)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM review_reviewtask WHERE source_id = %s AND state = 'open'", [source.pk])
        waiting = cursor.fetchone()[0]
    print(f"waiting items: {waiting:,} (source {SLUG}); PostgreSQL {connection.pg_version}")

    # Per run: name -> (p50, p95) of ours and of its baseline; the table shows the median over runs.
    runs: list[dict[str, tuple[tuple[float, float], tuple[float, float] | None, int]]] = []
    for run in range(args.runs):
        if run:
            prepare(args.items)  # the same starting state for every run
        figures: dict[str, tuple[tuple[float, float], tuple[float, float] | None, int]] = {}
        # 16 people working a queue: each claims, reads (think time), decides, claims again. First, on the
        # freshly vacuumed tables: after the stress cases below, autovacuum works through their dead rows.
        PROCESSES["on"] = True
        try:
            work_s = args.think_ms / 1000
            bare_w = summary(bench_bare(source, users, THREADS, args.work_claims, think_s=work_s))
            ours_w = bench_claims(source, users, THREADS, args.work_claims, think_s=work_s)
            figures[f"claim-next, {THREADS} reviewers at work (think {args.think_ms:.0f} ms), processes"] = (
                summary(ours_w), bare_w, len(ours_w))
        finally:
            PROCESSES["on"] = False
        for n in (1, THREADS):
            per = max(10, args.claims // n)
            bench_bare(source, users, n, 5)  # warm-up
            bare = summary(bench_bare(source, users, n, per))
            label = f"{n} reviewer{'s' if n > 1 else ''}"
            ours = bench_claims(source, users, n, per)
            figures[f"claim-next, {label}"] = (summary(ours), bare, len(ours))
            if n > 1:
                one_chain = bench_claims(source, users, n, per, chains=1)
                figures[f"claim-next, one audit chain (before), {label}"] = (summary(one_chain), bare,
                                                                            len(one_chain))
                PROCESSES["on"] = True
                try:
                    bare_p = summary(bench_bare(source, users, n, per))
                    ours_p = bench_claims(source, users, n, per)
                    figures[f"claim-next, {label}, processes"] = (summary(ours_p), bare_p, len(ours_p))
                    one_p = bench_claims(source, users, n, per, chains=1)
                    figures[f"claim-next, one audit chain (before), {label}, processes"] = (
                        summary(one_p), bare_p, len(one_p))
                finally:
                    PROCESSES["on"] = False
        views = bench_views(source, users[THREADS], args.views)
        floor = summary(views["lease renewal (minimal authed request)"])
        for key, values in views.items():
            base = None if key.startswith(("bare", "lease")) else floor
            figures[key] = (summary(values), base, len(values))
        runs.append(figures)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000

    print(f"\n{'measure':<56} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'base p50':>9} {'base p95':>9} {'p95 ratio':>9}")
    for name in runs[0]:
        p50 = med([r[name][0][0] for r in runs])
        p95 = med([r[name][0][1] for r in runs])
        n = runs[0][name][2]
        if runs[0][name][1] is not None:
            b50 = med([r[name][1][0] for r in runs])  # type: ignore[index]
            b95 = med([r[name][1][1] for r in runs])  # type: ignore[index]
            ratio = statistics.median([r[name][0][1] / r[name][1][1] for r in runs])  # type: ignore[index]
            per_run = " / ".join(f"{r[name][0][1] * 1000:.1f}" for r in runs)
            print(f"{name:<56} {n:>5} {p50:>8.2f} {p95:>8.2f} {b50:>9.2f} {b95:>9.2f} {ratio:>9.1f}   p95 by run: {per_run}")
        else:
            print(f"{name:<56} {n:>5} {p50:>8.2f} {p95:>8.2f}")
    print(f"\nmedian of {args.runs} run(s); claim baseline: the bare SQL claim; view baseline: the lease renewal")


if __name__ == "__main__":
    main()
