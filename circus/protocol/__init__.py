"""The Cap'n Proto protocol shared by the gateway and the agent (no database imports)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("circus.capnp")


@functools.cache
def schema() -> Any:
    """The loaded schema module (loaded on first use, not at import)."""
    import capnp

    return capnp.load(str(SCHEMA_PATH))


def protocol_version() -> int:
    return int(schema().protocolVersion)


def error_summary(exc: BaseException) -> str:
    """One line saying what went wrong, for logs and answers to the peer: a remote
    exception (pycapnp) carries the peer's whole traceback, whose last line is the
    error; a database error (SQLAlchemy) appends the statement and a link to its
    first line."""
    text = (getattr(exc, "description", None) or str(exc)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Traceback (most recent call last)" in text:
        errors = [line for line in lines if not line[0].isspace()
                  and not line.startswith(("Traceback", "(Background", "The above",
                                           "During handling"))
                  and "Traceback (most recent call last)" not in line]
        return (errors or lines)[-1][:500]
    return lines[0][:500]
