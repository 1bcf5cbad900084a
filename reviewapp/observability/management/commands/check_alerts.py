"""manage.py check_alerts [--record]: evaluate the alert rules now; exit status 1 when any fires."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reviewapp.observability import services


class Command(BaseCommand):
    help = "Evaluate the enabled alert rules against the ledger; non-zero exit when one fires."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--record", action="store_true", help="store the result on the rules (audited)")

    def handle(self, *args: Any, **options: Any) -> None:
        statuses = services.alerts_evaluate()
        if options["record"]:
            services.alerts_record(statuses=statuses)
        for status in statuses:
            self.stdout.write(f"{'FIRING' if status.firing else 'ok':6} {status.rule.name}: {status.detail}")
        firing = [s.rule.name for s in statuses if s.firing]
        if firing:
            raise CommandError(f"{len(firing)} alert(s) firing: {', '.join(firing)}")
