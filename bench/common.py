"""Shared helpers for the benchmark scripts: a Django setup against a bench database, timing, RSS."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/reviewapp_bench"


def setup_django(database_url: str | None = None) -> None:
    os.environ["DATABASE_URL"] = database_url or os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    os.environ.setdefault("REVIEWAPP_ENV", "test")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def ensure_database(url: str) -> None:
    """Create the bench database if it does not exist (needs a server that allows it)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_child(code: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """Run Python code in a child process; return its stdout and its peak RSS in KiB (from /usr/bin/time)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    rss = int(lines[-1])
    return "\n".join(lines[:-1]), rss
