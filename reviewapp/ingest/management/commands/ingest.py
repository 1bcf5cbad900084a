"""manage.py ingest SOURCE FILE: like an upload, with progress bars.

By default the command processes the batch itself (a CLI is not a web request, so there is no reason
to wait for a worker) and prints the counts; a refused file or a failed batch exits non-zero. With
--no-wait it only queues the batch for the workers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

from reviewapp.core.errors import DomainError
from reviewapp.ingest import selectors, services
from reviewapp.ingest.models import IngestBatch

FINISHED = (IngestBatch.Status.DONE, IngestBatch.Status.FAILED)
ERRORS_PRINTED = 10


class Command(BaseCommand):
    help = "Ingest a CSV, JSON Lines or Parquet file into a source, like an upload."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", help="the source's slug")
        parser.add_argument("file", help="path to a .csv, .tsv, .jsonl, .ndjson or .parquet file")
        parser.add_argument("--mode", choices=IngestBatch.Mode.values, default=IngestBatch.Mode.ALL_OR_NOTHING,
                            help="all_or_nothing (default) refuses the batch if any row is bad; quarantine keeps "
                                 "the good rows")
        parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                            help="process the batch here and print its counts (default); --no-wait only queues it "
                                 "for the workers")
        parser.add_argument("--user", help="username recorded as the uploader (default: system)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            source = selectors.source_get(slug=options["source"])
        except DomainError as exc:
            raise CommandError(exc.detail) from exc
        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"No such file: {path}")
        actor = None
        if options["user"]:
            actor = get_user_model().objects.filter(username=options["user"]).first()
            if actor is None:
                raise CommandError(f"No user named {options['user']!r}.")
        show = options["verbosity"] >= 1

        try:
            with open(path, "rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="upload",
                                             file=sys.stderr, disable=not show) as bar:
                batch, created = services.batch_submit(
                    actor=actor, source=source, uploaded_file=CallbackIOWrapper(bar.update, fh, "read"),
                    mode=options["mode"], enqueue=not options["wait"],
                )
        except DomainError as exc:
            details = "; ".join(e.get("message", "") for e in exc.errors if e.get("message") != exc.detail)
            raise CommandError(f"Refused {path.name}: {exc.detail}{' (' + details + ')' if details else ''}") from exc

        if not created:
            self.stdout.write(f"This file was already sent: batch {batch.pk} ({batch.status}).")
        else:
            self.stdout.write(f"Batch {batch.pk} queued ({batch.file_format}, {batch.size_bytes} bytes).")
        if not options["wait"]:
            return
        if batch.status not in FINISHED:
            self._process(batch, show=show)
        batch.refresh_from_db()
        self._report(batch)

    def _process(self, batch: IngestBatch, *, show: bool) -> None:
        # The bar is the batch's own progress (validation, then loading); the row count rides along.
        with tqdm(total=100, unit="%", desc="validate", file=sys.stderr, disable=not show,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]") as bar:
            def progress(rows: int, fraction: float | None) -> None:
                loading = fraction is not None and fraction > services.VALIDATE_SHARE
                bar.set_description_str(f"{'load' if loading else 'validate'} {rows:,} rows", refresh=False)
                if fraction is not None:
                    bar.update(max(0.0, round(100 * fraction, 1) - bar.n))

            try:
                services.batch_process(batch_id=batch.pk, on_progress=progress)
            except Exception as exc:
                # Anything unexpected still ends the batch with its reason, as the task's on_failure does.
                try:
                    services.batch_mark_failed(batch_id=batch.pk, reason=f"processing failed: {exc}")
                except DatabaseError:
                    self.stderr.write("Could not mark the batch failed; the reconciler will retry it.")
                raise CommandError(f"Batch {batch.pk} failed: {exc}") from exc
        # Another process (a worker) may hold the batch: wait for it to finish.
        while IngestBatch.objects.filter(pk=batch.pk).exclude(status__in=FINISHED).exists():
            time.sleep(0.5)

    def _report(self, batch: IngestBatch) -> None:
        counts = ", ".join(
            f"{name} {getattr(batch, name)}"
            for name in ("received", "accepted", "duplicates", "conflicts", "rejected", "labeled")
        )
        self.stdout.write(f"Batch {batch.pk} {batch.status}: {counts}.")
        for note in batch.notes:
            self.stdout.write(f"  note: {note}")
        if batch.drift:
            fields = ", ".join(f"{name} ({count})" for name, count in batch.drift.items())
            self.stdout.write(f"  fields outside the schema, kept: {fields}")
        errors = list(selectors.batch_errors(batch=batch)[:ERRORS_PRINTED])
        for error in errors:
            self.stdout.write(f"  row {error.row_number}, {error.field}: {error.message}")
        if errors and batch.rejected + batch.conflicts > len(errors):
            self.stdout.write(f"  … see GET /api/v1/batches/{batch.pk}/errors/?format=csv for all of them")
        if batch.status == IngestBatch.Status.FAILED:
            raise CommandError(f"Batch {batch.pk} failed: {batch.error}")
