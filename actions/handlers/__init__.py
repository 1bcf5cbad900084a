"""What every handler takes and returns, and the signed JSON POST shared by webhook and ticket.

A handler is a module with ``deliver(request) -> DeliveryResult`` and
``config_errors(*, url, template) -> list[dict]``; actions/registry.py maps kinds to modules.
Handlers get plain data (no model instances) and do no database writes except the log handler.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

from actions import signing, transport
from actions.ssrf import AllowList, EgressRefused, check_url


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # transient: timeout, connection error, 5xx, 408, 429
    FAIL = "fail"  # permanent: other 4xx, redirects, refused by the SSRF guard, bad configuration


@dataclass(frozen=True)
class DeliveryRequest:
    run_id: int
    idempotency_key: str
    kind: str
    name: str
    url: str
    secret: str
    template: Any
    connect_timeout: float
    read_timeout: float
    context: dict[str, Any]
    allow_list: AllowList = field(default_factory=lambda: AllowList(frozenset(), ()))


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome
    status_code: int | None = None
    error: str = ""
    retry_after_seconds: float | None = None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now_ts = time.time() if now is None else now
    return max(0.0, when.timestamp() - now_ts)


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def classify(result: transport.HttpResult) -> DeliveryResult:
    status = result.status
    snippet = " ".join(result.body_snippet.split())[:300]
    if 200 <= status < 300:
        return DeliveryResult(Outcome.DELIVERED, status)
    if status == 429 or status == 408 or status >= 500:
        return DeliveryResult(
            Outcome.RETRY, status, f"HTTP {status}: {snippet}".strip(), parse_retry_after(result.retry_after)
        )
    if 300 <= status < 400:
        return DeliveryResult(
            Outcome.FAIL, status, f"HTTP {status}: redirect to {result.location or '?'} not followed"
        )
    return DeliveryResult(Outcome.FAIL, status, f"HTTP {status}: {snippet}".strip())


def send_signed_json(request: DeliveryRequest, payload: Any) -> DeliveryResult:
    """POST ``payload`` as JSON to the request's URL, signed, with the run's idempotency key."""
    try:
        target = check_url(request.url, allow=request.allow_list)
    except EgressRefused as exc:
        return DeliveryResult(Outcome.FAIL, None, str(exc))
    body = json_bytes(payload)
    headers = {
        "Content-Type": "application/json",
        signing.IDEMPOTENCY_HEADER: request.idempotency_key,
        signing.SIGNATURE_HEADER: signing.signature_header(request.secret, body),
        "X-Reviewapp-Run": str(request.run_id),
    }
    try:
        result = transport.post(
            target, body=body, headers=headers,
            connect_timeout=request.connect_timeout, read_timeout=request.read_timeout,
        )
    except transport.TransportError as exc:
        return DeliveryResult(Outcome.RETRY, None, str(exc)[:500])
    return classify(result)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None
