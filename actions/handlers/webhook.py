"""Signed webhook: POST the decision as JSON, with an Idempotency-Key and an HMAC signature."""

from __future__ import annotations

from typing import Any

from actions.handlers import DeliveryRequest, DeliveryResult, send_signed_json
from actions.ssrf import EgressRefused, validate_url

EVENT_TYPE = "decision.action"


def payload(request: DeliveryRequest) -> dict[str, Any]:
    return {"type": EVENT_TYPE, **request.context}


def deliver(request: DeliveryRequest) -> DeliveryResult:
    return send_signed_json(request, payload(request))


def config_errors(*, url: str, template: Any) -> list[dict[str, Any]]:
    try:
        validate_url(url)
    except EgressRefused as exc:
        return [{"field": "url", "message": str(exc)}]
    return []
