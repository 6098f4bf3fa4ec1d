"""Ids that every log line of the current request or task carries.

A context variable holds them (``request_id``, ``build_id``, ``step_id``,
``evaluation_id``, and ``drv_path`` where a step is built); a logging filter
copies them onto each record, so the JSON formatter writes them and text lines
end with them. Threads and Celery tasks
each see their own.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import MappingProxyType

KEYS = ("request_id", "build_id", "step_id", "evaluation_id", "drv_path")
_EMPTY: Mapping[str, object] = MappingProxyType({})
_current: ContextVar[Mapping[str, object]] = ContextVar("circus_log_context", default=_EMPTY)
#: what a client may choose as its request id: short, no spaces or control characters
#: (it is written into log lines and echoed in a header)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def current() -> Mapping[str, object]:
    return _current.get()


def push(**ids: object) -> Token[Mapping[str, object]]:
    """From now on log lines carry ``ids`` too (None values are left out); undo with
    :func:`pop` — for hooks that open and close in different calls (Flask's)."""
    return _current.set({**_current.get(), **{k: v for k, v in ids.items() if v is not None}})


def pop(token: Token[Mapping[str, object]]) -> None:
    _current.reset(token)


@contextmanager
def bound(**ids: object) -> Iterator[None]:
    """Log lines within the block carry ``ids`` (None values are left out)."""
    token = push(**ids)
    try:
        yield
    finally:
        pop(token)


def request_id_from(header: str | None) -> str:
    """The client's ``X-Request-ID`` when it is safe to log, else a new one."""
    if header and _CLIENT_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = _current.get()
        for key in KEYS:
            if key in ids and not hasattr(record, key):
                setattr(record, key, ids[key])
        record.context = "".join(f" {k}={ids[k]}" for k in KEYS if k in ids)
        return True
