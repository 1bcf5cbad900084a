"""Export benchmark: N labeled rows to CSV, JSONL and Parquet; rows/s and peak RSS, beside raw COPY.

    python bench/export.py --rows 1000000 --runs 3 [--formats csv jsonl parquet jsonl-jbo]

Uses BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/reviewapp_bench); the data is made once
with set-based SQL and reused while the row count matches. Each export runs in its own process so that
its peak RSS is its own. Prints the median of --runs runs and, beside it, the same run's raw baseline
(PostgreSQL's COPY ... TO STDOUT of the same rows, and COPY through pyarrow to Parquet) as a ratio.
``jsonl-jbo`` is the earlier JSONL path (PostgreSQL's json_build_object streamed through COPY), for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DB, ensure_database, median, run_child, setup_django

CHILD = r"""
import os, resource, sys, time, json
sys.path.insert(0, {root!r})
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
import django; django.setup()
from django.db import connection
from reviewapp.exports import services as s
from reviewapp.ingest.models import Source
source = Source.objects.get(slug="bench")
spec = s.ExportSpec(source, {fmt!r}, s.ExportFilters(), s.Snapshot.now())
mode = {mode!r}
with connection.cursor() as cursor:
    cursor.execute("SELECT pg_backend_pid()")
    backend = cursor.fetchone()[0]
def server_cpu():  # the PostgreSQL backend's CPU seconds, when it runs on this machine
    try:
        fields = open(f"/proc/{{backend}}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
server0, client0 = server_cpu(), time.process_time()
start = time.perf_counter(); size = 0
if mode == "export":
    for chunk in s.stream_export(spec):
        size += len(chunk)
elif mode == "raw_copy":
    sql, params = s._select_sql(spec, csv_safe=False)
    for block in s._copy_blocks("COPY (" + s._bound(sql, params) + ") TO STDOUT WITH (FORMAT csv)"):
        size += len(block)
elif mode == "json_build_object":  # the JSONL export before 2026-11-22, kept as a reference
    pairs = []
    for col in spec.columns:
        value = col.sql.replace("->>", "->") if col.sql.startswith("(i.payload ->>") else col.sql
        pairs.append(s._quote_key(col.name) + ", " + ("p.prediction_set" if col.name == "prediction_set" else value))
    from_sql, from_params = s._from(spec)
    where, params = s._where(spec)
    params = from_params + params
    sql = "SELECT json_build_object(" + ", ".join(pairs) + ")::text " + from_sql + " WHERE " + where + " ORDER BY l.id"
    trick = " TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    for block in s._copy_blocks("COPY (" + s._bound(sql, params) + ")" + trick):
        size += len(block)
elif mode == "raw_parquet":
    import io, pyarrow.csv as pc, pyarrow.parquet as pq
    sql, params = s._select_sql(spec, csv_safe=False)
    raw = s._raw_connection()
    reader = pc.open_csv(io.BufferedReader(s._BlockReader(s._copy_blocks("COPY (" + s._bound(sql, params) + ") TO STDOUT WITH (FORMAT csv)", raw))),
                         read_options=pc.ReadOptions(autogenerate_column_names=True, block_size=8 << 20))
    sink = s._Sink()
    with pq.ParquetWriter(sink, reader.schema) as w:
        for b in reader:
            w.write_batch(b); size += len(sink.drain())
elapsed = time.perf_counter() - start
cpu = {{"client_cpu": time.process_time() - client0, "server_cpu": server_cpu() - server0}}
print(json.dumps({{"seconds": elapsed, "bytes": size, **cpu}}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

MAKE_DATA = """
INSERT INTO ingest_item (source_id, external_id, payload, payload_sha256, schema_version_id, state,
                         attempts, last_error, correlation_id, received_at, state_changed_at, route_reason)
SELECT %(source)s, 'pay-' || lpad(g::text, 9, '0'),
       jsonb_build_object('payment_id', 'pay-' || lpad(g::text, 9, '0'), 'amount', round((random() * 500)::numeric, 2),
         'currency', (ARRAY['USD','EUR','GBP'])[1 + g %% 3], 'merchant_category',
         (ARRAY['grocery','fuel','travel','electronics'])[1 + g %% 4], 'country', (ARRAY['US','GB','DE','NG'])[1 + g %% 4],
         'card_present', g %% 2 = 0, 'hour', g %% 24, 'account_age_days', g %% 2000, 'txn_count_24h', g %% 7,
         'description', (ARRAY['weekly shop','=cmd()','coffee, large','gift card bulk'])[1 + g %% 4]),
       md5(g::text) || md5(g::text), %(schema)s, 'decided', 0, '', gen_random_uuid(), now(), now(), ''
FROM generate_series(1, %(rows)s) AS g;
INSERT INTO review_label (item_id, source_id, label, origin, is_active, created_at)
SELECT id, source_id, CASE WHEN id %% 33 = 0 THEN 'fraud' ELSE 'legit' END, 'import', true, now()
FROM ingest_item WHERE source_id = %(source)s;
"""


def prepare(rows: int) -> None:
    from django.db import connection

    from reviewapp.ingest.models import Source
    from reviewapp.review.models import Label
    from tests.factories import make_payments_source

    source = Source.objects.filter(slug="bench").first()
    if source and Label.objects.filter(source=source).count() == rows:
        return
    if source:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM review_label WHERE source_id = %s", [source.pk])
            cursor.execute("DELETE FROM ingest_item WHERE source_id = %s", [source.pk])
    else:
        source = make_payments_source(slug="bench")
    print(f"making {rows:,} labeled rows ...", file=sys.stderr)
    with connection.cursor() as cursor:
        cursor.execute(MAKE_DATA, {"source": source.pk, "schema": source.schema_versions.first().pk, "rows": rows})
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["csv", "jsonl", "parquet", "jsonl-jbo"],
        choices=["csv", "jsonl", "parquet", "jsonl-jbo"],
    )
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    ensure_database(url)
    setup_django(url)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    prepare(args.rows)
    root = str(Path(__file__).resolve().parent.parent)
    env = {"DATABASE_URL": url, "REVIEWAPP_ENV": "test"}

    def measure(fmt: str, mode: str) -> tuple[dict, int]:
        out, rss = run_child(CHILD.format(root=root, fmt=fmt, mode=mode), env)
        return json.loads(out), rss

    # CPU seconds (this process + its PostgreSQL backend) hardly move with the load other work puts on the
    # machine, unlike wall-clock rows/s: they show where the time goes when the machine is shared.
    print(
        f"{'format':<12} {'rows/s (median)':>16} {'baseline rows/s':>16} {'ratio':>6} {'peak RSS MB':>12}"
        f" {'CPU s client+PG':>16} {'baseline CPU s':>16}"
    )
    cases = {
        "csv": ("csv", "export", "raw_copy"),
        "jsonl": ("jsonl", "export", "raw_copy"),
        "parquet": ("parquet", "export", "raw_parquet"),
        # What JSONL cost when PostgreSQL built it with json_build_object: a reference, not an export path.
        "jsonl-jbo": ("jsonl", "json_build_object", "raw_copy"),
    }
    for name in args.formats:
        fmt, mode, baseline = cases[name]
        runs = []
        for _ in range(args.runs):
            base, _ = measure(fmt, baseline)
            ours, rss = measure(fmt, mode)
            runs.append((args.rows / ours["seconds"], args.rows / base["seconds"], rss, ours, base))
        ours = median([r[0] for r in runs])
        base = median([r[1] for r in runs])
        ratio = median([r[0] / r[1] for r in runs])
        rss = max(r[2] for r in runs) / 1024
        ours_cpu = "+".join(f"{median([r[3][key] for r in runs]):.1f}" for key in ("client_cpu", "server_cpu"))
        base_cpu = "+".join(f"{median([r[4][key] for r in runs]):.1f}" for key in ("client_cpu", "server_cpu"))
        print(f"{name:<12} {ours:>16,.0f} {base:>16,.0f} {ratio:>6.2f} {rss:>12.0f} {ours_cpu:>16} {base_cpu:>16}")


if __name__ == "__main__":
    main()
