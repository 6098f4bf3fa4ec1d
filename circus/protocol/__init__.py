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
