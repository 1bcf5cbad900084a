"""Sustained mixed load: single-item ingest at a steady rate, scoring by a live worker, 16 reviewers claiming
and answering, and label exports, all at once for a fixed duration, over HTTP against gunicorn.

    python bench/load.py --duration 600 --rate 10 --reviewers 16 --export-every 60

Uses BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/reviewapp_bench; migrated here) or
``--database-url`` (``--no-migrate`` for a database already migrated, e.g. the test suite's) and a source of
its own (slug ``bench-load-<tag>``). Everything else is started here and stopped at the end: a redis-server
of its own on a free port (never the shared one), one celery worker (every queue), gunicorn.

Reported (JSON on stdout; ``--record`` also merges it into var/reliability-figures.json as ``load_mixed``,
which docs/reliability.md is rendered from):
- p50/p95 lag from received to scored and from received to decided, over the items ingested during the run;
- HTTP latency p50/p95 and error counts per kind of request (ingest, claim, verdict, export); an error is an
  answer outside the expected set (ingest 202/200, claim 200/204, verdict 201/409, export 200) or no answer;
- items not at rest after a drain period; RSS of the web and worker processes (their whole process trees) at
  start, midpoint and end, the maximum, and the growth over the second half (warm-up is over by then, so that is
  the figure a leak would show), sampled every ``--sample-every`` seconds;
- the ingest rate achieved: a pacer emits one request per 1/rate seconds and ``--senders`` threads send them;
  what they could not send in time is reported as the backlog, never sent late in a burst.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DB, ROOT, ensure_database, setup_django

EXPECTED = {"ingest": {200, 202}, "claim": {200, 204}, "verdict": {201, 409}, "export": {200}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"process on port {port} did not start") from None
            time.sleep(0.1)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (gunicorn and celery fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def rss_figures(series: list[float]) -> dict[str, Any]:
    """Start, end, max, and the growth over the second half of the run: warm-up (imports, caches, connection
    pools) happens early, so growth after the midpoint is the figure that would show a leak."""
    mid = series[len(series) // 2]
    return {
        "start": series[0],
        "mid": mid,
        "end": series[-1],
        "max": max(series),
        "second_half_growth": round(series[-1] - mid, 1),
        "samples": series,
    }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {k: [] for k in EXPECTED}
        self.codes: dict[str, dict[int, int]] = {k: {} for k in EXPECTED}
        self.errors: dict[str, list[str]] = {k: [] for k in EXPECTED}

    def add(self, kind: str, status: int, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.latency[kind].append(seconds * 1000)
            self.codes[kind][status] = self.codes[kind].get(status, 0) + 1
            if status not in EXPECTED[kind] and len(self.errors[kind]) < 5:
                self.errors[kind].append(f"{status}: {detail[:200]}")

    def summary(self) -> dict[str, Any]:
        out = {}
        for kind in EXPECTED:
            codes = self.codes[kind]
            out[kind] = {
                "requests": sum(codes.values()),
                "errors": sum(n for code, n in codes.items() if code not in EXPECTED[kind]),
                "p50_ms": pct(self.latency[kind], 50),
                "p95_ms": pct(self.latency[kind], 95),
                "codes": {str(k): v for k, v in sorted(codes.items())},
                "examples": self.errors[kind],
            }
        return out


def call(method: str, url: str, token: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, repr(exc).encode()


def setup_rows(slug: str, reviewers: int, thresholds: dict[str, float], history: int) -> dict[str, Any]:
    """The source with a trained champion; an ingester, an exporter and the reviewers, each with a token.
    The suite's own factories make them (the same rows the tests use)."""
    from rest_framework.authtoken.models import Token

    from reviewapp.demo import payments
    from scoring import services as scoring_services
    from tests.factories import UserFactory, make_payments_source
    from tests.scoring.helpers import add_labeled_history

    source = make_payments_source(slug=slug, thresholds=thresholds)
    add_labeled_history(source, payments.generate_payments(history, seed=11, start=1))
    scoring_services.model_cache_clear()
    champion = scoring_services.model_train(source=source, actor=None)
    if not champion.is_champion:
        raise RuntimeError(f"the model did not become champion: {champion.status} {champion.error}")
    tag = slug.rsplit("-", 1)[-1]

    def user(name: str, role: str) -> str:
        return Token.objects.create(user=UserFactory(username=f"{name}-{tag}", role=role)).key

    return {
        "source": source.pk,
        "ingester": user("ingest", "admin"),
        "exporter": user("export", "ml_engineer"),
        "reviewers": [user(f"rev{i}", "analyst") for i in range(reviewers)],
    }


def lag_figures(source_id: int, since: float) -> dict[str, Any]:
    from django.db import connection

    sql = """
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.95) WITHIN GROUP (ORDER BY s), count(*)
    FROM (SELECT extract(epoch FROM {end} - i.received_at) AS s FROM ingest_item i {join}
          WHERE i.source_id = %s AND i.received_at >= to_timestamp(%s)) t
    """
    scored = sql.format(end="p.created_at", join="JOIN scoring_prediction p ON p.id = i.prediction_id")
    decided = sql.format(
        end="d.created_at", join="JOIN review_decision d ON d.item_id = i.id AND d.supersedes_id IS NULL"
    )
    out = {}
    with connection.cursor() as cursor:
        for name, query in (("scored", scored), ("decided", decided)):
            cursor.execute(query, [source_id, since])
            p50, p95, n = cursor.fetchone()
            out[f"lag_{name}_p50_s"] = round(p50, 2) if p50 is not None else None
            out[f"lag_{name}_p95_s"] = round(p95, 2) if p95 is not None else None
            out[f"lag_{name}_items"] = n
        cursor.execute(
            "SELECT state, count(*) FROM ingest_item WHERE source_id = %s AND received_at >= to_timestamp(%s) "
            "GROUP BY state",
            [source_id, since],
        )
        out["states"] = dict(cursor.fetchall())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 10 minutes)")
    parser.add_argument("--rate", type=float, default=10, help="single-item ingests per second")
    parser.add_argument("--reviewers", type=int, default=16)
    parser.add_argument("--senders", type=int, default=4, help="threads sending the paced ingest requests")
    parser.add_argument("--export-every", type=float, default=60, help="seconds between label exports")
    parser.add_argument("--sample-every", type=float, default=15, help="seconds between RSS samples")
    parser.add_argument("--drain", type=float, default=60, help="seconds allowed after the load to come to rest")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--history", type=int, default=1500, help="labeled rows the champion is trained on")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--no-migrate", action="store_true")
    parser.add_argument("--record", action="store_true", help="merge the figures into var/reliability-figures.json")
    args = parser.parse_args(argv)

    began = time.monotonic()
    if not args.no_migrate:
        ensure_database(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="reviewapp-load-"))
    redis_port = free_port()
    broker_url = f"redis://127.0.0.1:{redis_port}/0"
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ.pop("TEST_DATABASE_NAME", None)
    setup_django(args.database_url)
    sys.path.insert(0, str(ROOT))  # the suite's factories make the rows
    from django.core.management import call_command

    if not args.no_migrate:
        call_command("migrate", verbosity=0)
    slug = f"bench-load-{uuid.uuid4().hex[:6]}"
    rows = setup_rows(slug, args.reviewers, {"legit": 0.98, "fraud": 0.995}, args.history)

    env = {
        **os.environ,
        "DATABASE_URL": args.database_url,
        "CELERY_BROKER_URL": broker_url,
        "REVIEWAPP_ENV": os.environ.get("REVIEWAPP_ENV", "test"),
        "DJANGO_SETTINGS_MODULE": "reviewapp.settings",
        "UPLOAD_ROOT": str(workdir / "uploads"),
    }
    env.pop("PYTEST_VERSION", None)
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: open(workdir / f"{name}.log", "ab") for name in ("redis", "worker", "web")}  # noqa: SIM115
    web_port = free_port()
    try:
        procs["redis"] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=logs["redis"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(redis_port, procs["redis"])
        procs["worker"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "reviewapp",
                "worker",
                "-Q",
                "ingest,scoring,training,actions,exports,maintenance",
                "-c",
                "2",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"load-{slug}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=logs["worker"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs["web"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "reviewapp.wsgi",
                "-b",
                f"127.0.0.1:{web_port}",
                "-w",
                str(args.web_workers),
                "--threads",
                "8",
                "--timeout",
                "120",
            ],
            cwd=ROOT,
            env=env,
            stdout=logs["web"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(web_port, procs["web"])
        # Load starts once the worker consumes: its start-up is not the pipeline's lag.
        from reviewapp.celery import app

        worker_name = f"load-{slug}@{os.uname().nodename}"
        deadline = time.monotonic() + 180
        while not app.control.ping(destination=[worker_name], timeout=1.0):
            if procs["worker"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the celery worker did not start")
        base = f"http://127.0.0.1:{web_port}/api/v1"
        setup_seconds = time.monotonic() - began
        # First request warms each web worker's imports; it is not part of the figures.
        call("GET", f"{base}/sources/{slug}/", rows["ingester"])
        time.sleep(2.0)

        stats = Stats()
        stop = threading.Event()
        started = time.time()
        rss: dict[str, list[float]] = {"web": [], "worker": []}

        def sample_rss() -> None:
            for name in rss:
                rss[name].append(tree_rss_mb(procs[name].pid))

        sample_rss()
        from reviewapp.demo import payments

        stream = json.loads(
            payments.generate_payments(int(args.rate * args.duration) + 100, seed=12, start=5_000_000).to_json(
                orient="records"
            )
        )

        ticks: queue.Queue[int | None] = queue.Queue()

        def pacer() -> None:
            """A steady rate: one tick per 1/rate seconds, whatever the answers' speed; the senders take them.
            Ticks left over at the end are reported (the rate the system could not keep up with)."""
            interval, next_at, i = 1.0 / args.rate, time.monotonic(), 0
            while not stop.is_set() and i < len(stream):
                ticks.put(i)
                i += 1
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))

        def sender() -> None:
            while True:
                i = ticks.get()
                if i is None:
                    return
                row = {k: v for k, v in stream[i].items() if k != payments.LABEL_FIELD}
                t0 = time.monotonic()
                status, body = call("POST", f"{base}/sources/{slug}/items/", rows["ingester"], row)
                stats.add("ingest", status, time.monotonic() - t0, body.decode(errors="replace"))

        def reviewer(token: str, seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                t0 = time.monotonic()
                status, body = call("POST", f"{base}/queue/claim/", token, {"source": slug})
                stats.add("claim", status, time.monotonic() - t0, body.decode(errors="replace"))
                if status != 200:
                    stop.wait(0.5 + rng.random())
                    continue
                item_id = json.loads(body)["id"]
                stop.wait(rng.uniform(0.5, 2.0))  # reading the item
                t0 = time.monotonic()
                status, body = call(
                    "POST",
                    f"{base}/items/{item_id}/verdicts/",
                    token,
                    {"label": rng.choice(["legit", "legit", "fraud"])},
                )
                stats.add("verdict", status, time.monotonic() - t0, body.decode(errors="replace"))

        def exporter() -> None:
            while not stop.wait(args.export_every):
                t0 = time.monotonic()
                status, body = call(
                    "GET", f"{base}/sources/{slug}/labels/export/?format=csv", rows["exporter"], timeout=300
                )
                stats.add("export", status, time.monotonic() - t0, body[:200].decode(errors="replace"))

        senders = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
        threads = [threading.Thread(target=pacer, daemon=True), threading.Thread(target=exporter, daemon=True)]
        threads += [
            threading.Thread(target=reviewer, args=(token, n), daemon=True) for n, token in enumerate(rows["reviewers"])
        ]
        for thread in threads + senders:
            thread.start()
        while time.time() - started < args.duration:
            time.sleep(min(args.sample_every, max(0.1, args.duration - (time.time() - started))))
            sample_rss()
        stop.set()
        backlog = ticks.qsize()
        while not ticks.empty():  # what the senders could not send in time is not sent late
            ticks.get_nowait()
        for _ in senders:
            ticks.put(None)
        for thread in threads + senders:
            thread.join(timeout=120)
        load_seconds = time.time() - started

        # Drain: scoring catches up; what waits for review is at rest (queued) by definition.
        from reviewapp.ingest.models import Item

        resting = {"auto_decided", "queued", "decided", "failed"}
        drain_started = time.monotonic()
        while time.monotonic() - drain_started < args.drain:
            if not Item.objects.filter(source_id=rows["source"]).exclude(state__in=resting).exists():
                break
            time.sleep(1.0)
        not_at_rest = (
            Item.objects.filter(source_id=rows["source"], received_at__gte=_ts(started))
            .exclude(state__in=resting)
            .count()
        )
        sample_rss()
        summary = stats.summary()
        result: dict[str, Any] = {
            "setup_s": round(setup_seconds, 1),
            "duration_s": round(load_seconds, 1),
            "drain_s": round(time.monotonic() - drain_started, 1),
            "rate_per_s": args.rate,
            "reviewers": args.reviewers,
            **lag_figures(rows["source"], started),
            "not_at_rest": not_at_rest,
            "errors": sum(v["errors"] for v in summary.values()),
            "requests": summary,
            "ingest_rate_achieved_per_s": round(summary["ingest"]["requests"] / load_seconds, 2),
            "ingest_backlog_at_end": backlog,
            **{f"rss_{name}_mb": rss_figures(series) for name, series in rss.items()},
        }
    finally:
        for name in ("web", "worker", "redis"):
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        for log in logs.values():
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    if args.record:
        from tests.reliability.helpers import record_figures

        record_figures(
            "load_mixed",
            tried=summary["ingest"]["requests"],
            lost=not_at_rest,
            duplicated=0,
            seconds=result["duration_s"],
            rate_per_s=args.rate,
            reviewers=args.reviewers,
            lag_scored_p95_s=result["lag_scored_p95_s"],
            lag_decided_p95_s=result["lag_decided_p95_s"],
            errors=result["errors"],
            verdicts=summary["verdict"]["requests"],
            exports=summary["export"]["requests"],
            ingest_p95_ms=summary["ingest"]["p95_ms"],
            claim_p95_ms=summary["claim"]["p95_ms"],
            ingest_rate_achieved_per_s=result["ingest_rate_achieved_per_s"],
            not_at_rest=not_at_rest,
            rss_web_mb="{start}->{mid}->{end}".format(**result["rss_web_mb"]),
            rss_worker_mb="{start}->{mid}->{end}".format(**result["rss_worker_mb"]),
        )
    print(json.dumps(result, indent=2, default=str))
    return result


def _ts(epoch: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, tz=UTC)


if __name__ == "__main__":
    main()
