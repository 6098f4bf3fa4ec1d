"""Secrets Circus must read back (webhook HMAC keys), encrypted with the server key.

Fernet (AES-128-CBC + HMAC-SHA256) with a key derived from ``server.secret_key``;
rotating the server key makes sealed secrets unreadable (re-enter them).
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

from circus.common.errors import InvalidInput


def _fernet(server_key: str) -> Fernet:
    if not server_key:
        raise InvalidInput("server.secret_key is not set; cannot store secrets")
    raw = hashlib.sha256(b"circus-sealed-secret\0" + server_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(raw))


def seal(server_key: str, plaintext: str) -> str:
    return _fernet(server_key).encrypt(plaintext.encode()).decode()


def unseal(server_key: str, sealed: str) -> str | None:
    """The plaintext, or ``None`` when it was sealed with another key or is corrupt."""
    try:
        return _fernet(server_key).decrypt(sealed.encode()).decode()
    except (InvalidToken, ValueError):
        return None
