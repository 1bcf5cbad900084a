"""The explicit registry of action kinds: one handler module per kind (see actions/handlers)."""

from __future__ import annotations

from types import ModuleType

from actions.handlers import log, ticket, webhook
from actions.models import ActionConfig

HANDLERS: dict[str, ModuleType] = {
    ActionConfig.Kind.WEBHOOK.value: webhook,
    ActionConfig.Kind.TICKET.value: ticket,
    ActionConfig.Kind.LOG.value: log,
}
# Kinds that send requests out (and so need a URL and a signing secret).
NETWORK_KINDS = frozenset({ActionConfig.Kind.WEBHOOK.value, ActionConfig.Kind.TICKET.value})


def handler_for(kind: str) -> ModuleType:
    try:
        return HANDLERS[kind]
    except KeyError:
        raise LookupError(f"no handler for action kind {kind!r}") from None
