"""Agent authentication: bearer tokens against configured SHA-256 digests, TLS policy."""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Sequence

from circus.common.config import RpcSettings


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_accepted(token: str, digests: Sequence[str]) -> bool:
    """Constant-time comparison against every configured digest (no early exit)."""
    candidate = token_digest(token)
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(candidate, digest.lower())
    return accepted


def server_ssl_context(rpc: RpcSettings) -> ssl.SSLContext | None:
    tls = rpc.tls
    if not tls.enabled:
        return None
    assert tls.cert_file and tls.key_file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca:
        context.load_verify_locations(tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_cert_cn(peer_cert: dict[str, object] | None) -> str | None:
    if not peer_cert:
        return None
    for entry in peer_cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None
