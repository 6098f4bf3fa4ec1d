"""Agent authentication: bearer tokens against configured SHA-256 digests, TLS policy."""

from __future__ import annotations

import ssl

from circus.common.config import RpcSettings

# the digest check is shared with the remote workers' API (circus.remote_workers)
from circus.common.tokens import token_accepted, token_digest

__all__ = ["client_cert_cn", "server_ssl_context", "token_accepted", "token_digest"]


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
