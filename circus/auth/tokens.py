"""Random secrets whose SHA-256 digest is all the database keeps."""

from __future__ import annotations

import hashlib
import secrets


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    """``<prefix>_<43 url-safe characters>`` (256 bits)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"
