"""Form posts: read the submitted values, run the service, show its errors inline.

The services' ``InvalidInput``/``Conflict``/``PermissionDenied`` details are
``{field: [reasons]}`` — the same object the API answers as JSON — so a bad
form comes back with each reason under its field and the values kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import request
from sqlalchemy.orm import Session

from circus.common.errors import CircusError, InvalidInput
from circus.server.context import db_session


@dataclass
class Form:
    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    #: an error that belongs to no single field
    message: str | None = None
    #: HTTP status to render a failed form with
    status: int = 200

    @classmethod
    def posted(cls, *names: str) -> Form:
        """The submitted values of ``names`` (missing ones are empty strings)."""
        return cls({name: request.form.get(name, "").strip() if name not in SECRET_FIELDS
                    else request.form.get(name, "") for name in names})

    def get(self, name: str) -> str:
        return self.values.get(name, "")

    @property
    def ok(self) -> bool:
        return not self.errors and self.message is None

    def add(self, name: str, reason: str) -> None:
        self.errors.setdefault(name, []).append(reason)
        self.status = 400

    def require(self, *names: str) -> None:
        for name in names:
            if not self.get(name):
                self.add(name, "required")

    def integer(self, name: str, *, minimum: int | None = None) -> int | None:
        raw = self.get(name)
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            self.add(name, "must be a whole number")
            return None
        if minimum is not None and value < minimum:
            self.add(name, f"must be at least {minimum}")
            return None
        if abs(value) >= 2**31:
            self.add(name, "too large")
            return None
        return value

    def number(self, name: str, *, minimum: float | None = None) -> float | None:
        raw = self.get(name)
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            self.add(name, "must be a number")
            return None
        if value != value or value in (float("inf"), float("-inf")):
            self.add(name, "must be a finite number")
            return None
        if minimum is not None and value < minimum:
            self.add(name, f"must be at least {minimum}")
            return None
        return value

    def run(self, work: Callable[[Session], object]) -> bool:
        """If the form is valid, make the change (a service call) and commit; a service
        error is rolled back and shown in the form. True when the change was made."""
        if not self.ok:
            return False
        session = db_session()
        try:
            work(session)
            session.commit()
        except CircusError as exc:
            session.rollback()
            self.fail(exc)
            return False
        return True

    def fail(self, error: CircusError) -> None:
        """Put a service error under the fields it names (or above the form)."""
        self.status = error.http_status
        details: Any = error.details
        placed = False
        if isinstance(details, dict):
            for name, reasons in details.items():
                # {field: [reasons]} only: other details (``{"name": "x"}``) are context
                if name in self.values and isinstance(reasons, list):
                    self.errors.setdefault(name, []).extend(str(r) for r in reasons)
                    placed = True
        if not placed or not isinstance(error, InvalidInput):
            self.message = error.message


#: never echoed back into the form, never stripped
SECRET_FIELDS = frozenset({"password", "current_password", "new_password", "new_password2"})


def split_list(raw: str) -> list[str]:
    """``a, b c`` → ``["a", "b", "c"]`` (systems and features fields)."""
    return [part for part in raw.replace(",", " ").split() if part]


def query_text(name: str, limit: int = 256) -> str:
    """A free-text query argument, trimmed, bounded, without NUL (PostgreSQL refuses it)."""
    return request.args.get(name, "").replace("\x00", "").strip()[:limit]
