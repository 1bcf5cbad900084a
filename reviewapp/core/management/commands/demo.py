"""Set up a demo: users per role, the payments source, history, a first model and a scored queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from reviewapp.core.roles import Role, ensure_role_groups
from reviewapp.demo import payments
from reviewapp.queues import ALL_QUEUES

DEMO_USERS = [
    ("analyst", "analyst-demo-pass", Role.ANALYST),
    ("admin", "admin-demo-pass", Role.ADMIN),
    ("mlengineer", "mlengineer-demo-pass", Role.ML_ENGINEER),
]
HOST, PORT = "127.0.0.1", 8000


class Command(BaseCommand):
    help = "Set up demo users, the payments source, labeled history, a trained model and a scored queue."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--history", type=int, default=8000, help="labeled payments to import")
        parser.add_argument("--incoming", type=int, default=2000, help="unlabeled payments to score")
        parser.add_argument("--serve", action="store_true", help="then serve web + worker until Ctrl-C")
        parser.add_argument("--port", type=int, default=PORT)

    def handle(self, *args: Any, **opts: Any) -> None:
        if settings.IS_PRODUCTION:
            raise CommandError("demo writes well-known passwords; run it with REVIEWAPP_ENV=demo")
        started = time.monotonic()
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        self._users()
        worker = self._start_worker()
        try:
            source = self._source()
            self._ingest(source, history=opts["history"], incoming=opts["incoming"])
            self.stdout.write(self.style.SUCCESS(f"demo ready in {time.monotonic() - started:.0f}s"))
            self._print_logins(opts["port"])
            if opts["serve"]:
                self._serve(worker, opts["port"])
        finally:
            _stop(worker)

    def _users(self) -> None:
        ensure_role_groups()
        User = get_user_model()
        for username, password, role in DEMO_USERS:
            user, _ = User.objects.get_or_create(username=username)
            user.set_password(password)
            user.is_staff = role == Role.ADMIN
            user.is_superuser = role == Role.ADMIN
            user.save()
            user.groups.add(Group.objects.get(name=role.value))

    def _start_worker(self) -> subprocess.Popen:
        self.stdout.write("starting a Celery worker (with beat) ...")
        log = open(Path(settings.VAR_DIR) / "demo-worker.log", "ab")  # noqa: SIM115 - lives as long as the worker
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "reviewapp", "worker", "-B", "-c", "2", "--loglevel=INFO",
             "-Q", ",".join(ALL_QUEUES), "-s", str(Path(settings.VAR_DIR) / "beat-schedule")],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )

    def _source(self) -> Any:
        from reviewapp.ingest.models import Source
        from reviewapp.ingest.services import source_create

        existing = Source.objects.filter(slug="payments").first()
        if existing:
            return existing
        admin = get_user_model().objects.get(username="admin")
        return source_create(
            actor=admin, slug="payments", name="Card payments", labels=payments.LABELS,
            json_schema=payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
            text_fields=payments.TEXT_FIELDS,
        )

    def _ingest(self, source: Any, *, history: int, incoming: int) -> None:
        from reviewapp.ingest.models import IngestBatch, Item
        from reviewapp.ingest.services import batch_submit
        from scoring.models import ModelVersion
        from scoring.services import model_train

        admin = get_user_model().objects.get(username="admin")
        labeled = payments.generate_payments(history, seed=11)
        batch = self._wait_batch(self._submit(batch_submit, admin, source, labeled, "history.csv"), IngestBatch)
        if not ModelVersion.objects.filter(source=source, is_champion=True).exists():
            self.stdout.write("training a first model on the imported labels ...")
            model = model_train(source=source, actor=admin, algorithm="logreg", promote=True)
            metrics = model.metrics
            self.stdout.write(
                f"  model v{model.version} ({model.algorithm}, {model.status}): "
                f"accuracy {metrics.get('accuracy', 0):.3f}, macro F1 {metrics.get('macro_f1', 0):.3f}, "
                f"ECE {metrics.get('ece', 0):.4f}"
            )
        fresh = payments.generate_payments(incoming, seed=29, start=history).drop(columns=[payments.LABEL_FIELD])
        batch = self._wait_batch(self._submit(batch_submit, admin, source, fresh, "incoming.csv"), IngestBatch)
        pending = Item.objects.filter(source=source, batch=batch)
        with tqdm(total=batch.accepted, desc="scoring", unit="items") as bar:
            deadline = time.monotonic() + 300
            while True:
                done = pending.exclude(state__in=["received", "scored"]).count()
                bar.update(done - bar.n)
                if done >= batch.accepted or time.monotonic() > deadline:
                    break
                time.sleep(0.5)

    def _submit(self, batch_submit: Any, actor: Any, source: Any, frame: Any, name: str) -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            frame.to_csv(path, index=False)
            upload = SimpleUploadedFile(name, path.read_bytes(), content_type="text/csv")
        batch, _ = batch_submit(actor=actor, source=source, uploaded_file=upload)
        return batch

    def _wait_batch(self, batch: Any, model: Any) -> Any:
        with tqdm(desc=f"ingesting {batch.filename}", unit="rows") as bar:
            deadline = time.monotonic() + 300
            while True:
                batch = model.objects.get(pk=batch.pk)
                bar.update(batch.rows_processed - bar.n)
                if batch.status in ("done", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise CommandError("the worker did not process the demo batch; see var/demo-worker.log")
                time.sleep(0.3)
        if batch.status == "failed":
            raise CommandError(f"demo batch failed: {batch.error}")
        return batch

    def _print_logins(self, port: int) -> None:
        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS(f"reviewapp is at http://{HOST}:{port}/"))
        for username, password, role in DEMO_USERS:
            self.stdout.write(f"  {role.value:<12} login: {username:<11} password: {password}")

    def _serve(self, worker: subprocess.Popen, port: int) -> None:
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "reviewapp.wsgi", "-b", f"{HOST}:{port}", "-w", "2",
             "--access-logfile", "-"],
            env=os.environ.copy(),
        )
        self.stdout.write("serving; press Ctrl-C to stop web and worker")
        # A supervisor's SIGTERM stops the demo like Ctrl-C does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while web.poll() is None and worker.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            _stop(web)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
