"""Bearer tokens checked against configured SHA-256 digests (agents, remote workers).

A config names the *digests* of the tokens it accepts (``auth_tokens`` or
``auth_tokens_file``, one hex digest per line), so a leaked config file gives
no one a working token. Standard library only: the agent's wheel carries it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

HEX_DIGITS = frozenset("0123456789abcdef")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_accepted(token: str, digests: Sequence[str]) -> bool:
    """Constant-time comparison against every configured digest (no early exit)."""
    candidate = token_digest(token)
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(candidate, digest.lower())
    return accepted


def is_digest(value: str) -> bool:
    """A SHA-256 hex digest, as ``auth_tokens`` entries must be."""
    return len(value) == 64 and all(c in HEX_DIGITS for c in value.lower())
