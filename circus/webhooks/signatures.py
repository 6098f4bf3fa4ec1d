"""Checking that a delivery comes from the forge: HMAC signatures and GitLab's token.

Every comparison is constant-time (``hmac.compare_digest``). A missing header
is a 401 (no credentials), a wrong one a 403.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from circus.common.enums import ForgeType
from circus.common.errors import PermissionDenied, Unauthenticated

#: signature headers per forge, first present wins (Forgejo also sends Gitea's)
SIGNATURE_HEADERS: dict[ForgeType, tuple[str, ...]] = {
    ForgeType.github: ("x-hub-signature-256",),
    ForgeType.gitea: ("x-gitea-signature",),
    ForgeType.forgejo: ("x-forgejo-signature", "x-gitea-signature"),
}
GITLAB_TOKEN_HEADER = "x-gitlab-token"


def hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(forge: ForgeType, secret: str, headers: Mapping[str, str], body: bytes) -> None:
    """Raise ``Unauthenticated``/``PermissionDenied`` unless the delivery is authentic.

    ``headers`` has lower-case names.
    """
    if forge is ForgeType.gitlab:
        token = headers.get(GITLAB_TOKEN_HEADER)
        if not token:
            raise Unauthenticated("missing X-Gitlab-Token header")
        if not hmac.compare_digest(token.encode(), secret.encode()):
            raise PermissionDenied("X-Gitlab-Token does not match the webhook's secret")
        return
    names = SIGNATURE_HEADERS[forge]
    given = next((headers[name] for name in names if headers.get(name)), None)
    if given is None:
        raise Unauthenticated(f"missing signature header ({', '.join(names)})")
    given = given.strip()
    if forge is ForgeType.github:
        scheme, _, given = given.partition("=")
        if scheme != "sha256":
            raise PermissionDenied("X-Hub-Signature-256 must be sha256=<hex>")
    expected = hmac_hex(secret, body)
    if not hmac.compare_digest(given.lower().encode(), expected.encode()):
        raise PermissionDenied("signature does not match the body and the webhook's secret")
