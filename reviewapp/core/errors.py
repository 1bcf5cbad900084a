"""Domain errors raised by services; the API layer maps them to 4xx responses."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status_code = 400

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class ValidationFailed(DomainError):
    status_code = 400


class NotFound(DomainError):
    status_code = 404


class PermissionDeniedError(DomainError):
    status_code = 403


class Conflict(DomainError):
    status_code = 409


class PayloadTooLarge(DomainError):
    status_code = 413


class ServiceUnavailable(DomainError):
    status_code = 503
