"""manage.py compute_drift [SOURCE] [--days N]: write drift reports now and print the most drifted features."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reviewapp.ingest.models import Source
from reviewapp.observability import services


class Command(BaseCommand):
    help = "Compute per-feature drift (PSI) of recent items against each champion's training data."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", nargs="?", help="source slug (default: every source with items)")
        parser.add_argument("--days", type=int, default=None, help="recent window in days (default 7)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["source"]:
            source = Source.objects.filter(slug=options["source"]).first()
            if source is None:
                raise CommandError(f"No source {options['source']!r}.")
            reports = [services.drift_compute(source_id=source.pk, window_days=options["days"])]
        else:
            reports = services.drift_compute_all(window_days=options["days"])
        for report in reports:
            slug = report.source.slug
            if report.status != "ok":
                self.stdout.write(f"{slug}: {report.status}: {report.detail}")
                continue
            top = ", ".join(f"{f['name']} {f['psi']:.3f}" for f in report.features[:5])
            self.stdout.write(f"{slug}: max PSI {report.max_psi:.3f} ({report.n_recent} recent items vs "
                              f"{report.n_reference} training rows): {top}")
