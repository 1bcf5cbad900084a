"""Ticket: a generic HTTP JSON POST whose body is the configured template with {{placeholders}}
filled from the decision. Only JSON string values are touched, by plain substitution (never eval):
a value that is exactly one placeholder takes the context value with its JSON type, otherwise the
placeholder is replaced by the value's text."""

from __future__ import annotations

import re
from typing import Any

from actions.handlers import DeliveryRequest, DeliveryResult, send_signed_json
from actions.ssrf import EgressRefused, validate_url

PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")
# The context keys a template may use (see selectors.run_context).
PLACEHOLDERS = (
    "run_id", "idempotency_key", "action", "decision_id", "item_id", "external_id", "source", "label",
    "origin", "reason", "decided_at", "model_version", "policy_version", "is_compensation",
    "compensates_run_id", "compensates_decision_id", "compensates_label",
)
MAX_TEMPLATE_DEPTH = 20


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _render_string(value: str, context: dict[str, Any]) -> Any:
    whole = PLACEHOLDER.fullmatch(value.strip())
    if whole and whole.group(1) in context:
        return context[whole.group(1)]
    return PLACEHOLDER.sub(lambda m: _text(context[m.group(1)]) if m.group(1) in context else m.group(0), value)


def render(template: Any, context: dict[str, Any], _depth: int = 0) -> Any:
    if _depth > MAX_TEMPLATE_DEPTH:
        raise ValueError("template nested too deeply")
    if isinstance(template, str):
        return _render_string(template, context)
    if isinstance(template, list):
        return [render(v, context, _depth + 1) for v in template]
    if isinstance(template, dict):
        return {k: render(v, context, _depth + 1) for k, v in template.items()}
    return template


def _placeholders_in(template: Any, _depth: int = 0) -> set[str]:
    if _depth > MAX_TEMPLATE_DEPTH:
        raise ValueError("template nested too deeply")
    if isinstance(template, str):
        return set(PLACEHOLDER.findall(template))
    values = template.values() if isinstance(template, dict) else template if isinstance(template, list) else []
    found: set[str] = set()
    for value in values:
        found |= _placeholders_in(value, _depth + 1)
    return found


def deliver(request: DeliveryRequest) -> DeliveryResult:
    return send_signed_json(request, render(request.template, request.context))


def config_errors(*, url: str, template: Any) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    try:
        validate_url(url)
    except EgressRefused as exc:
        errors.append({"field": "url", "message": str(exc)})
    if not isinstance(template, dict) or not template:
        errors.append({"field": "template", "message": "a ticket needs a JSON object template"})
        return errors
    try:
        unknown = sorted(_placeholders_in(template) - set(PLACEHOLDERS))
    except ValueError as exc:
        return [*errors, {"field": "template", "message": str(exc)}]
    if unknown:
        errors.append({"field": "template",
                       "message": f"unknown placeholder(s) {', '.join(unknown)}; known: {', '.join(PLACEHOLDERS)}"})
    return errors
