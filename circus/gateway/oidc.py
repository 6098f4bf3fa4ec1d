"""Agents authenticated by a GitHub Actions OIDC ID token (``queue_runner.rpc.oidc``).

A workflow run asks GitHub for an ID token with Circus's audience and hands it
to its ephemeral agent, which presents it instead of a bearer token. The gateway
checks the signature against the issuer's JWKS (``jwks_url``, else the
``jwks_uri`` of ``<issuer>/.well-known/openid-configuration``), the issuer, the
audience, expiry and not-before (one minute of leeway), then the allowlists:
``repository`` (required), and where configured ``sub`` (exact or by prefix),
``job_workflow_ref`` and ``ref``. Keys are cached for ten minutes; a token signed
with a key id not in the cache fetches the set again (at most once a minute), as
issuers rotate keys. Verification uses joserfc (the JOSE library authlib itself
builds on) and plain HTTP from the standard library.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from circus.common.config import OidcSettings

log = logging.getLogger(__name__)

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384"]
KEYS_TTL_SECS = 600.0
REFETCH_AFTER_SECS = 60.0
LEEWAY_SECS = 60
HTTP_TIMEOUT_SECS = 10.0


class OidcRejected(Exception):
    """The token is not acceptable; the message says why (it is logged and sent back)."""


@dataclass(frozen=True)
class OidcIdentity:
    repository: str
    subject: str
    ref: str | None
    workflow_ref: str | None


def looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts) and token.startswith("ey")


class OidcVerifier:
    def __init__(self, settings: OidcSettings) -> None:
        assert settings.issuer is not None
        self.settings = settings
        self.issuer = settings.issuer.rstrip("/")
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ keys

    def _get_json(self, url: str) -> Any:
        if not url.startswith(("https://", "http://")):
            raise OidcRejected(f"the issuer's key URL is not http(s): {url[:100]!r}")
        # the scheme is checked above (S310 cannot see it)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECS) as response:  # noqa: S310
            return json.loads(response.read(1 << 20))

    def _fetch_keys(self) -> KeySet:
        url = self.settings.jwks_url
        if not url:
            config = self._get_json(f"{self.issuer}/.well-known/openid-configuration")
            url = config.get("jwks_uri") if isinstance(config, dict) else None
            if not isinstance(url, str):
                raise OidcRejected("the issuer's openid-configuration names no jwks_uri")
        return KeySet.import_key_set(self._get_json(url))

    def keys(self, kid: str | None) -> KeySet:
        """The issuer's keys, fetched again when stale or when ``kid`` is unknown."""
        with self._lock:
            now = time.monotonic()
            stale = self._keys is None or now - self._fetched_at > KEYS_TTL_SECS
            unknown = (kid is not None and self._keys is not None
                       and not any(k.kid == kid for k in self._keys.keys)
                       and now - self._fetched_at > REFETCH_AFTER_SECS)
            if stale or unknown:
                try:
                    self._keys = self._fetch_keys()
                except (OSError, ValueError, JoseError) as exc:
                    if self._keys is None:
                        raise OidcRejected(f"cannot fetch the issuer's keys: {exc}") from None
                    log.warning("OIDC: refreshing the issuer's keys failed: %s", exc)
                else:
                    self._fetched_at = now
            assert self._keys is not None
            return self._keys

    # ----------------------------------------------------------------- verify

    def verify(self, token: str) -> OidcIdentity:
        kid = _header_kid(token)
        try:
            decoded = jwt.decode(token, self.keys(kid), algorithms=ALGORITHMS)
        except JoseError as exc:
            raise OidcRejected(f"OIDC token rejected: {exc.description or exc}") from None
        claims = decoded.claims
        registry = JWTClaimsRegistry(
            leeway=LEEWAY_SECS,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "values": list(self.settings.audiences)},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise OidcRejected(f"OIDC token rejected: {exc.description or exc}") from None
        return self._allowed(claims)

    def _allowed(self, claims: dict[str, Any]) -> OidcIdentity:
        config = self.settings
        repository = str(claims.get("repository") or "")
        allowed = {r.lower() for r in config.allowed_repositories}
        if repository.lower() not in allowed:
            raise OidcRejected(f"OIDC token rejected: repository {repository!r} is not allowed")
        subject = str(claims["sub"])
        if (config.allowed_subjects or config.allowed_subject_prefixes) and not (
                subject in config.allowed_subjects
                or any(subject.startswith(p) for p in config.allowed_subject_prefixes)):
            raise OidcRejected(f"OIDC token rejected: subject {subject!r} is not allowed")
        workflow_ref = claims.get("job_workflow_ref")
        if config.allowed_workflow_refs and workflow_ref not in config.allowed_workflow_refs:
            raise OidcRejected(f"OIDC token rejected: workflow {workflow_ref!r} is not allowed")
        ref = claims.get("ref")
        if config.allowed_refs and ref not in config.allowed_refs:
            raise OidcRejected(f"OIDC token rejected: ref {ref!r} is not allowed")
        return OidcIdentity(repository=repository, subject=subject,
                            ref=str(ref) if ref is not None else None,
                            workflow_ref=str(workflow_ref) if workflow_ref else None)


def _header_kid(token: str) -> str | None:
    try:
        segment = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise OidcRejected("OIDC token rejected: malformed header") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None
