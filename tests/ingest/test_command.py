"""manage.py ingest: inline processing with counts, and a non-zero exit on a refused file."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from reviewapp.ingest.models import IngestBatch, Item
from tests.ingest.conftest import payments_frame, to_bytes

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("ingest", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ingest_processes_inline_and_prints_counts(source, tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    path.write_bytes(to_bytes(payments_frame(12, labeled=True), fmt))
    output = run("payments", str(path))
    assert "done: received 12, accepted 12" in output and "labeled 12" in output
    assert Item.objects.filter(state="decided").count() == 12
    again = run("payments", str(path))
    assert "already sent" in again and IngestBatch.objects.count() == 1


def test_refused_file_is_a_command_error(source, tmp_path):
    path = tmp_path / "garbage.csv"
    path.write_bytes(b"\x00\xff\xfe" * 100)
    with pytest.raises(CommandError, match=r"Refused garbage\.csv"):
        run("payments", str(path))
    assert IngestBatch.objects.count() == 0


def test_failed_batch_is_a_command_error_with_rows(source, tmp_path):
    frame = payments_frame(3).astype(object)
    frame.loc[1, "currency"] = "XXX"
    path = tmp_path / "bad.csv"
    path.write_bytes(frame.to_csv(index=False).encode())
    with pytest.raises(CommandError, match="failed: 1 of 3 rows"):
        run("payments", str(path))
    quarantined = tmp_path / "bad2.csv"
    quarantined.write_bytes(frame.to_csv(index=False, sep=";").encode())
    output = run("payments", str(quarantined), "--mode", "quarantine")
    assert "accepted 2" in output and "row 2, currency" in output


def test_unknown_source_and_missing_file(source, tmp_path):
    with pytest.raises(CommandError, match="No source named"):
        run("nope", str(tmp_path / "x.csv"))
    with pytest.raises(CommandError, match="No such file"):
        run("payments", str(tmp_path / "x.csv"))


def test_no_wait_only_queues(source, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(to_bytes(payments_frame(2), "jsonl"))
    output = run("payments", str(path), "--no-wait")
    assert "queued" in output and IngestBatch.objects.get().status == "queued" and not Item.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_manage_py_exits_non_zero_on_a_refused_file(source, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, database_url_for_worker

    path = tmp_path / "archive.csv"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 64)
    env = {**os.environ, "DATABASE_URL": database_url_for_worker(), "REVIEWAPP_ENV": "test"}
    env.pop("PYTEST_VERSION", None)
    done = subprocess.run([sys.executable, "manage.py", "ingest", "payments", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Compressed files (gzip) are not accepted" in done.stderr
    assert IngestBatch.objects.count() == 0
