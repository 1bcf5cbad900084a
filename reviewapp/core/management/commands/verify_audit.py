from typing import Any

from django.core.management.base import BaseCommand, CommandError

from reviewapp.core.audit import audit_chain_heads, audit_verify
from reviewapp.core.models import AuditEvent


class Command(BaseCommand):
    help = "Check every hash chain of the audit trail; exits non-zero at the first break."

    def handle(self, *args: Any, **options: Any) -> None:
        for brk in audit_verify():
            raise CommandError(f"audit chain broken at event #{brk.event_id}: {brk.reason}")
        count = AuditEvent.objects.count()
        heads = audit_chain_heads()
        self.stdout.write(self.style.SUCCESS(f"audit chain intact: {count} events verified in {len(heads)} chain(s)"))
        if options["verbosity"] >= 2:  # the heads are what to anchor outside the database
            for head in heads:
                self.stdout.write(f"chain {head['chain']}: head #{head['id']} {head['hash']}")
