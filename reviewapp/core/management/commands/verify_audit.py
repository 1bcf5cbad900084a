from typing import Any

from django.core.management.base import BaseCommand, CommandError

from reviewapp.core.audit import audit_verify
from reviewapp.core.models import AuditEvent


class Command(BaseCommand):
    help = "Check the audit trail's hash chain; exits non-zero at the first break."

    def handle(self, *args: Any, **options: Any) -> None:
        for brk in audit_verify():
            raise CommandError(f"audit chain broken at event #{brk.event_id}: {brk.reason}")
        count = AuditEvent.objects.count()
        self.stdout.write(self.style.SUCCESS(f"audit chain intact: {count} events verified"))
