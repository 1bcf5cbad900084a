"""Ingest benchmark: N demo payments from CSV and from Parquet into PostgreSQL.

    python bench/ingest.py --rows 1000000 --rss-rows 200000 --score-rows 20000 --runs 3

For each format and run it measures, each in a fresh copy of a prepared database:
  * raw baseline: a plain PostgreSQL COPY of the same file into a plain table (Parquet through pyarrow's
    CSV writer into the same COPY), in the same run, so the ratio to it is comparable across machines;
  * ingest alone: ``batch_submit`` + ``batch_process`` of --rows rows in a child process (the "web"
    process; its peak RSS is its own), scoring messages not sent;
  * ingest alone again with --rss-rows rows: is the ingest process's peak RSS flat in the file's size?
  * ingest + score + route: --score-rows rows with a live Celery worker (started here, two processes)
    and a trained champion model, from the first byte read until no item of the batch waits; peak RSS
    of the ingest process and of the worker's processes.
It prints medians over --runs with the same run's baseline as a ratio.

Databases: BENCH_DATABASE_URL (default in bench/common.py) names the server and a base name; this script
works in ``<base>_ingest_tpl`` (migrated, a source, --history labeled rows, a trained and promoted model;
built once, --rebuild to redo) and copies it to ``<base>_ingest_run`` for each measurement, so every run
starts from the same state and the export benchmark's data in ``<base>`` is left alone. The broker is
CELERY_BROKER_URL (default: the settings' embedded filesystem broker).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DB, ROOT, ensure_database, median, run_child

ID_OFFSET = 10_000_000  # incoming payments get ids after the labeled history's

SETUP_CHILD = r"""
import os, sys, json
sys.path.insert(0, {root!r})
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
import django; django.setup()
from django.core.files import File
from django.core.management import call_command
call_command("migrate", verbosity=0)
from reviewapp.demo import payments
from reviewapp.ingest import services
from scoring.services import model_train
services._send = lambda name, kwargs: True
source = services.source_create(actor=None, slug="bench", name="Bench payments", labels=payments.LABELS,
    json_schema=payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
    text_fields=payments.TEXT_FIELDS)
with open({history!r}, "rb") as fh:
    batch, _ = services.batch_submit(actor=None, source=source, uploaded_file=File(fh, name="history.csv"), enqueue=False)
services.batch_process(batch_id=batch.pk)
batch.refresh_from_db()
model = model_train(source=source, actor=None, algorithm="logreg", promote=True)
print(json.dumps({{"history": batch.labeled, "model": model.status, "champion": model.is_champion}}))
print(0)
"""

INGEST_CHILD = r"""
import os, sys, time, json
sys.path.insert(0, {root!r})
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
import django; django.setup()
from django.core.files import File
from reviewapp.ingest import services
from reviewapp.ingest.models import Source
if {quiet!r}:
    services._send = lambda name, kwargs: True  # ingest alone: nobody listens
source = Source.objects.get(slug="bench")
start = time.time()
with open({path!r}, "rb") as fh:
    batch, _ = services.batch_submit(actor=None, source=source, uploaded_file=File(fh, name={name!r}), enqueue=False)
services.batch_process(batch_id=batch.pk)
done = time.time()
batch.refresh_from_db()
print(json.dumps({{"start": start, "done": done, "status": batch.status, "accepted": batch.accepted,
                  "error": batch.error[:300], "batch": batch.pk}}))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report the parent's peak.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""

PURGE_CHILD = r"""
import os, sys
sys.path.insert(0, {root!r})
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
import django; django.setup()
from reviewapp.celery import app
app.control.purge()
print(0)
"""


# --- databases -----------------------------------------------------------------------------------------


def server_and_base(url: str) -> tuple[str, str]:
    server, base = url.rsplit("/", 1)
    return server, base


def admin_execute(url: str, *statements: str) -> None:
    import psycopg

    server, _ = server_and_base(url)
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


def database_exists(url: str) -> bool:
    import psycopg

    server, name = server_and_base(url)
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone())


def fresh_copy(template_url: str, run_url: str) -> None:
    _, template = server_and_base(template_url)
    _, run = server_and_base(run_url)
    admin_execute(run_url, f'DROP DATABASE IF EXISTS "{run}" WITH (FORCE)', f'CREATE DATABASE "{run}" TEMPLATE "{template}"')


# --- data ------------------------------------------------------------------------------------------------


def make_files(directory: Path, rows: int, history: int) -> dict[str, Path]:
    """Incoming payments (no label column) as CSV and Parquet, and a labeled history CSV; made once."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": directory / f"payments-{rows}.csv",
        "parquet": directory / f"payments-{rows}.parquet",
        "history": directory / f"history-{history}.csv",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    sys.path.insert(0, str(ROOT))
    from reviewapp.demo import payments

    print(f"making {rows:,} payments and {history:,} labeled ones in {directory} ...", file=sys.stderr)
    if not paths["history"].exists():
        payments.generate_payments(history, seed=11).to_csv(paths["history"], index=False)
    step = 250_000  # generated in slices, so that making the file needs little memory either
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    with open(paths["csv"], "w", encoding="utf-8", newline="") as out:
        for start in range(0, rows, step):
            frame = payments.generate_payments(min(step, rows - start), seed=29, start=ID_OFFSET + start)
            frame = frame.drop(columns=[payments.LABEL_FIELD])
            frame.to_csv(out, index=False, header=start == 0)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(paths["parquet"], table.schema)
            writer.write_table(table, row_group_size=100_000)
    if writer is not None:
        writer.close()
    return paths


# --- measurements -----------------------------------------------------------------------------------------


def baseline(url: str, path: Path, fmt: str) -> float:
    """Seconds for a plain COPY of the file into a plain table (no index, no constraint)."""
    import psycopg
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    columns = ["payment_id", "amount", "currency", "merchant_category", "country", "card_present", "hour",
               "account_age_days", "txn_count_24h", "description"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        conn.execute(f"CREATE TABLE bench_raw ({', '.join(c + ' text' for c in columns)})")
        start = time.perf_counter()
        with conn.cursor() as cursor, cursor.copy("COPY bench_raw FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
            if fmt == "csv":
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 20):
                        copy.write(block)
            else:
                import io

                for k, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=100_000)):
                    sink = io.BytesIO()
                    pacsv.write_csv(batch, sink, write_options=pacsv.WriteOptions(include_header=k == 0))
                    copy.write(sink.getvalue())
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bench_raw")
    return elapsed


def ingest(url: str, path: Path, *, quiet: bool) -> tuple[dict, int]:
    code = INGEST_CHILD.format(root=str(ROOT), path=str(path), name=path.name, quiet=quiet)
    out, rss = run_child(code, {"DATABASE_URL": url, "REVIEWAPP_ENV": "test"})
    result = json.loads(out.strip().splitlines()[-1])
    if result["status"] != "done":
        raise RuntimeError(f"batch {result['batch']} {result['status']}: {result['error']}")
    return result, rss


class Worker:
    """A celery worker on every queue, two processes, pointed at the run database."""

    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Worker:
        sys.path.insert(0, str(ROOT))
        from reviewapp.queues import ALL_QUEUES  # plain constants; Django stays out of this process

        env = {**os.environ, "DATABASE_URL": self.url, "REVIEWAPP_ENV": "test"}
        run_child(PURGE_CHILD.format(root=str(ROOT)), {"DATABASE_URL": self.url, "REVIEWAPP_ENV": "test"})
        self.handle = open(self.log, "wb")  # closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "reviewapp", "worker", "-Q", ",".join(ALL_QUEUES), "-c", "2",
             "-n", f"bench-{uuid.uuid4().hex[:6]}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while b" ready." not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)
        # Each worker process warms itself at start (imports, champion model; scoring.tasks._warm_on_start).
        # Measure the steady state: start when both processes are warm, and report how long that took.
        ready = time.monotonic()
        while self.log.read_bytes().count(b"scoring warm-up done") < 2:
            if self.proc.poll() is not None or time.monotonic() > ready + 300:
                print("worker warm-up not seen in its log; measuring anyway", file=sys.stderr)
                break
            time.sleep(0.3)
        self.warm_seconds = time.monotonic() - ready
        return self

    def peak_rss_kib(self) -> tuple[int, int]:
        """(largest single process, sum over the worker's processes) of their peak RSS."""
        assert self.proc is not None
        pids = [self.proc.pid, *children(self.proc.pid)]
        peaks = [vm_hwm(pid) for pid in pids]
        return max(peaks), sum(peaks)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.handle.close()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def still_waiting(conn: Any, batch_id: int) -> bool:
    """Whether any item of the batch still waits for scoring or routing: one probe of the partial index on
    waiting items (``item_pending_idx``), on one connection for the whole wait.

    The harness used to open a connection every 0.25 s and count the batch's waiting items; right after a 1M-row
    load the statistics are stale, so each count scanned the whole table (0.3-1.4 s) and the poller took
    20-30% of the machine's CPU and churned PostgreSQL's buffer cache under the worker (measured: the same 1M-row
    run used 383 CPU-seconds with the count, 314 with this probe). That was the harness's cost, not the product's."""
    # With the statistics stale after the load the planner would AND the batch_id index in (every poll walks the
    # whole batch) and build a bitmap of every waiting item. ``batch_id + 0`` and no bitmap scans (this
    # connection only) keep it on a plain scan of the partial index, which stops at the first waiting item.
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM ingest_item WHERE state IN ('received', 'scored') AND batch_id + 0 = %s)",
        [batch_id],
    ).fetchone()
    return bool(row[0])


def ingest_score_route(url: str, path: Path, rows: int, log: Path, timeout: float) -> tuple[float, int, int, int]:
    """(items/s, ingest process peak RSS KiB, worker largest process peak KiB, worker total KiB)."""
    import psycopg

    with Worker(url, log) as worker:
        result, rss = ingest(url, path, quiet=False)
        deadline = time.monotonic() + timeout
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET enable_bitmapscan = off")
            while still_waiting(conn, result["batch"]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"items still waiting after {timeout}s; see {log}")
                time.sleep(0.25)
        end = time.time()
        largest, total = worker.peak_rss_kib()
    print(f"  worker warm-up (after ready): {worker.warm_seconds:.1f}s", file=sys.stderr)
    return rows / (end - result["start"]), rss, largest, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for ingest alone")
    parser.add_argument("--rss-rows", type=int, default=200_000, help="a second size for ingest alone (RSS)")
    parser.add_argument("--score-rows", type=int, default=20_000, help="rows for ingest + score + route")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--history", type=int, default=20_000, help="labeled rows the model is trained on")
    parser.add_argument("--data-dir", default=os.environ.get("BENCH_DATA_DIR", "/tmp/reviewapp-bench-ingest"))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the template database")
    parser.add_argument("--skip-score", action="store_true")
    parser.add_argument("--score-only", action="store_true",
                        help="only ingest + score + route (with its raw COPY baseline); no ingest-alone runs")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="SCORING_CHUNK_SIZE for the ingest process and the worker (default: the settings')")
    args = parser.parse_args()
    if args.chunk_size is not None:
        os.environ["SCORING_CHUNK_SIZE"] = str(args.chunk_size)  # children inherit it (run_child, Worker)

    url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    server, base = server_and_base(url)
    template_url, run_url = f"{server}/{base}_ingest_tpl", f"{server}/{base}_ingest_run"
    data = Path(args.data_dir)
    # --score-only needs no large file: the history file is what the template is built from.
    big = make_files(data, args.score_rows if args.score_only else args.rows, args.history)
    mid = big if args.score_only else make_files(data, args.rss_rows, args.history)
    small = make_files(data, args.score_rows, args.history)

    if args.rebuild or not database_exists(template_url):
        print("preparing the template database (migrate, source, history, model) ...", file=sys.stderr)
        admin_execute(template_url, f'DROP DATABASE IF EXISTS "{base}_ingest_tpl" WITH (FORCE)')
        ensure_database(template_url)
        out, _ = run_child(SETUP_CHILD.format(root=str(ROOT), history=str(big["history"])),
                           {"DATABASE_URL": template_url, "REVIEWAPP_ENV": "test"})
        print(f"  {out.strip().splitlines()[-1]}", file=sys.stderr)

    results: dict[str, dict[str, list]] = {}
    for fmt in args.formats.split(","):
        r = results.setdefault(fmt, {"ours": [], "base": [], "ratio": [], "rss": [], "rss_small": [], "items": [],
                                     "items_base": [], "items_ratio": [], "score_rss": [], "worker_max": [],
                                     "worker_sum": []})
        for run in range(args.runs):
            if not args.score_only:
                fresh_copy(template_url, run_url)
                base_s = baseline(run_url, big[fmt], fmt)
                result, rss = ingest(run_url, big[fmt], quiet=True)
                ours = args.rows / (result["done"] - result["start"])
                r["ours"].append(ours)
                r["base"].append(args.rows / base_s)
                r["ratio"].append(ours / (args.rows / base_s))
                r["rss"].append(rss)
                print(f"{fmt} run {run + 1}: ingest {ours:,.0f} rows/s, raw COPY {args.rows / base_s:,.0f} rows/s, "
                      f"peak RSS {rss / 1024:.0f} MB", file=sys.stderr)
                fresh_copy(template_url, run_url)
                _, rss_mid = ingest(run_url, mid[fmt], quiet=True)
                r["rss_small"].append(rss_mid)
            if not args.skip_score:
                fresh_copy(template_url, run_url)
                # The same run's raw COPY of the same (small) file: the ratio is comparable across machines.
                small_base = args.score_rows / baseline(run_url, small[fmt], fmt)
                items, score_rss, largest, total = ingest_score_route(
                    run_url, small[fmt], args.score_rows, data / f"worker-{fmt}-{run}.log", timeout=3600)
                r["items"].append(items)
                r["items_base"].append(small_base)
                r["items_ratio"].append(items / small_base)
                r["score_rss"].append(score_rss)
                r["worker_max"].append(largest)
                r["worker_sum"].append(total)
                print(f"{fmt} run {run + 1}: ingest+score+route {items:,.0f} items/s (raw COPY {small_base:,.0f}"
                      f" rows/s, ratio {items / small_base:.3f}), worker peak "
                      f"{largest / 1024:.0f} MB per process, {total / 1024:.0f} MB in all", file=sys.stderr)
    admin_execute(run_url, f'DROP DATABASE IF EXISTS "{base}_ingest_run" WITH (FORCE)')

    if not args.score_only:
        print(f"\ningest alone, {args.rows:,} rows, median of {args.runs}:")
        print(f"{'format':<8} {'rows/s':>10} {'raw COPY rows/s':>16} {'ratio':>6} {'peak RSS MB':>12} "
              f"{'RSS at ' + format(args.rss_rows, ','):>16}")
    for fmt, r in results.items():
        if not r["ours"]:
            continue
        small_rss = f"{max(r['rss_small']) / 1024:.0f}" if r["rss_small"] else "-"
        print(f"{fmt:<8} {median(r['ours']):>10,.0f} {median(r['base']):>16,.0f} {median(r['ratio']):>6.2f} "
              f"{max(r['rss']) / 1024:>12.0f} {small_rss:>16}")
    if not args.skip_score:
        print(f"\ningest + score + route, {args.score_rows:,} rows, live worker (2 processes), median of {args.runs}:")
        print(f"{'format':<8} {'items/s':>10} {'raw COPY rows/s':>16} {'ratio':>6} {'ingest RSS MB':>14} "
              f"{'worker MB/proc':>15} {'worker MB all':>14}")
        for fmt, r in results.items():
            print(f"{fmt:<8} {median(r['items']):>10,.0f} {median(r['items_base']):>16,.0f} "
                  f"{median(r['items_ratio']):>6.3f} {max(r['score_rss']) / 1024:>14.0f} "
                  f"{max(r['worker_max']) / 1024:>15.0f} {max(r['worker_sum']) / 1024:>14.0f}")


if __name__ == "__main__":
    main()
