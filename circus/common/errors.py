"""One exception hierarchy, mapped once to HTTP codes and once to CLI exit codes."""

from __future__ import annotations

from typing import Any


class CircusError(Exception):
    http_status = 500
    exit_code = 1

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(CircusError):
    http_status = 400
    exit_code = 2


class Unauthenticated(CircusError):
    http_status = 401
    exit_code = 3


class PermissionDenied(CircusError):
    http_status = 403
    exit_code = 3


class NotFound(CircusError):
    http_status = 404
    exit_code = 4


class Conflict(CircusError):
    http_status = 409
    exit_code = 5


class Unavailable(CircusError):
    """A dependency (database, broker, Nix) cannot be reached right now."""

    http_status = 503
    exit_code = 6
