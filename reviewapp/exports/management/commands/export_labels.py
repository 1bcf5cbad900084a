import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_datetime
from tqdm import tqdm

from reviewapp.core.errors import DomainError
from reviewapp.exports.services import FORMATS, ExportFilters, Snapshot, count_rows, labels_export_stream
from reviewapp.ingest.models import Source
from reviewapp.review.models import Label


class Command(BaseCommand):
    help = "Write a source's labeled rows with provenance, like GET /api/v1/sources/{slug}/labels/export/."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source")
        parser.add_argument("--format", choices=FORMATS, default="csv")
        parser.add_argument("-o", "--output", required=True, help="file to write")
        parser.add_argument("--since", help="ISO timestamp, inclusive")
        parser.add_argument("--until", help="ISO timestamp, exclusive")
        parser.add_argument("--label")
        parser.add_argument("--origin", choices=Label.Origin.values)
        parser.add_argument("--reviewer")
        parser.add_argument("--model-version", type=int)
        parser.add_argument("--qa-only", action="store_true")
        parser.add_argument("--agreed-only", action="store_true")
        parser.add_argument("--include-raw", action="store_true", help="add the raw payload JSON as a column")
        parser.add_argument("--cutoff", help="reproduce the snapshot taken at this ISO time")
        parser.add_argument("--max-label-id", type=int, help="with --cutoff: the snapshot's last label id")

    def _time(self, opts: dict[str, Any], key: str) -> Any:
        if not opts.get(key):
            return None
        parsed = parse_datetime(opts[key])
        if parsed is None:
            raise CommandError(f"--{key.replace('_', '-')} is not an ISO timestamp: {opts[key]!r}")
        return parsed

    def handle(self, *args: Any, **opts: Any) -> None:
        source = Source.objects.filter(slug=opts["source"]).first()
        if source is None:
            raise CommandError(f"unknown source {opts['source']!r}")
        filters = ExportFilters(
            since=self._time(opts, "since"),
            until=self._time(opts, "until"),
            label=opts["label"],
            origin=opts["origin"],
            reviewer=opts["reviewer"],
            model_version=opts["model_version"],
            qa_only=opts["qa_only"],
            agreed_only=opts["agreed_only"],
        )
        snapshot = None
        if opts["cutoff"]:
            snapshot = Snapshot(self._time(opts, "cutoff"), opts["max_label_id"] or Snapshot.now().max_label_id, None)
        try:
            spec, stream = labels_export_stream(
                actor=None,
                source=source,
                fmt=opts["format"],
                filters=filters,
                snapshot=snapshot,
                include_raw=opts["include_raw"],
            )
        except DomainError as exc:
            raise CommandError("; ".join([exc.detail, *(f"{e['field']}: {e['message']}" for e in exc.errors)])) from exc
        total = count_rows(spec)
        output = Path(opts["output"])
        written = 0
        with output.open("wb") as out, tqdm(total=total, unit="rows", file=self.stderr) as bar:
            for chunk in stream:
                out.write(chunk)
                if spec.fmt != "parquet":
                    written += chunk.count(b"\n")
                    bar.update(min(written, total) - bar.n)
            bar.update(total - bar.n)
        snapshot_note = {"cutoff": spec.snapshot.cutoff.isoformat(), "max_label_id": spec.snapshot.max_label_id}
        self.stderr.write(f"wrote {total} rows to {output} (reproduce with: {json.dumps(snapshot_note)})")
