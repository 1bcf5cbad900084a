"""Helpers for the action plane tests: a real HTTP receiver on loopback and decisions made the way the
review area makes them (decision and action runs in one transaction)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from django.db import transaction

from actions.models import ActionConfig
from actions.services import (
    action_config_create,
    action_runs_create_compensation,
    action_runs_create_for_decision,
)
from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Decision, ReviewTask, Verdict

DOCS = Path(__file__).resolve().parents[2] / "docs" / "actions.md"


def docs_recipe() -> dict[str, Any]:
    """Execute the receiver snippet of docs/actions.md, so the documented recipe is what we test."""
    text = DOCS.read_text()
    marker = text.index("<!-- the test suite executes this snippet")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, "docs/actions.md lost its python snippet"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(DOCS), "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    block: bool = False  # apply the effect, then hold the response until released


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def key(self) -> str:
        return self.headers.get("Idempotency-Key", "")

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A downstream system: records every request; applies an effect once per idempotency key
    (as docs/actions.md tells receivers to), and answers from a script (default 200)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.effects: Counter[str] = Counter()
        self.script: deque[Reply] = deque()
        self.lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append(Recorded(self.path, dict(self.headers.items()), body, time.monotonic()))
                    reply = receiver.script.popleft() if receiver.script else Reply()
                    key = self.headers.get("Idempotency-Key", "")
                    if (reply.block or 200 <= reply.status < 300) and key not in receiver.effects:
                        receiver.effects[key] += 1
                if reply.block:
                    receiver.release.wait(30)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body.encode())
                except OSError:
                    pass  # the client is gone (its worker was killed): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def reply(self, *replies: Reply) -> None:
        self.script.extend(replies)

    def on(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]


def make_config(source: Source, actor: Any, **kwargs: Any) -> tuple[ActionConfig, str]:
    kwargs.setdefault("kind", "webhook")
    kwargs.setdefault("name", f"action-{uuid.uuid4().hex[:6]}")
    return action_config_create(source=source, actor=actor, **kwargs)


def make_item(source: Source, external_id: str | None = None) -> Item:
    payload = {"n": external_id}
    return Item.objects.create(
        source=source, external_id=external_id or f"tx-{uuid.uuid4().hex[:10]}", payload=payload,
        payload_sha256=hashlib.sha256(json.dumps(payload).encode()).hexdigest(),
        schema_version=source.schema_versions.first(), state=Item.State.AUTO_DECIDED,
    )


def decide(item: Item, *, label: str, reviewer: Any = None) -> Decision:
    """Make the item's current decision the way the review area does: the old one retired, the new
    one created, and in the same transaction the action runs (and compensations on an override)."""
    with transaction.atomic():
        verdict = None
        if reviewer is not None:
            kind = ReviewTask.Kind.QA if item.decisions.exists() else ReviewTask.Kind.REVIEW
            task = ReviewTask.objects.create(
                item=item, source=item.source, kind=kind, state=ReviewTask.State.DONE,
                round=ReviewTask.objects.filter(item=item, kind=kind).count() + 1,
            )
            verdict = Verdict.objects.create(task=task, item=item, round=task.round, reviewer=reviewer, label=label)
        current = Decision.objects.select_for_update().filter(item=item, is_current=True).first()
        if current is not None:
            current.is_current = False
            current.save(update_fields=["is_current"])
        decision = Decision.objects.create(
            item=item, label=label, origin=Decision.Origin.REVIEWER if reviewer else Decision.Origin.MODEL,
            verdict=verdict, decided_by=reviewer, supersedes=current, reason="test",
        )
        if current is not None:
            action_runs_create_compensation(old_decision=current, new_decision=decision)
        action_runs_create_for_decision(decision=decision)
    return decision


def wait_state(run_id: int, *states: str, timeout: float = 20) -> Any:
    from actions.models import ActionRun
    from tests.conftest import wait_for

    return wait_for(
        lambda: ActionRun.objects.filter(pk=run_id, state__in=states).first(),
        timeout=timeout, what=f"run {run_id} to reach {states}",
    )


