"""The agent's GitHub Actions ID token (``[agent] oidc_audience``).

Inside a workflow run with ``permissions: id-token: write``, GitHub exposes
``ACTIONS_ID_TOKEN_REQUEST_URL`` and ``ACTIONS_ID_TOKEN_REQUEST_TOKEN``; a GET of
that URL with ``&audience=<aud>`` and the request token as bearer answers
``{"value": "<JWT>"}``. Tokens live minutes, so one is fetched for every
registration. Standard library only: the agent stays small.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

URL_VARIABLE = "ACTIONS_ID_TOKEN_REQUEST_URL"
TOKEN_VARIABLE = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
TIMEOUT_SECS = 15.0


class OidcTokenUnavailable(Exception):
    """No ID token could be had (not in a workflow run, or GitHub refused)."""


def github_actions_token(audience: str) -> str:
    url, request_token = os.environ.get(URL_VARIABLE), os.environ.get(TOKEN_VARIABLE)
    if not url or not request_token:
        raise OidcTokenUnavailable(
            f"{URL_VARIABLE}/{TOKEN_VARIABLE} are not set: run in a GitHub Actions job with "
            "'permissions: id-token: write', or configure auth_token")
    if not url.startswith(("https://", "http://")):
        raise OidcTokenUnavailable(f"{URL_VARIABLE} is not an http(s) URL")
    separator = "&" if urllib.parse.urlsplit(url).query else "?"
    full = f"{url}{separator}audience={urllib.parse.quote(audience)}"
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        full, headers={"Authorization": f"bearer {request_token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECS) as response:  # noqa: S310
            body = json.loads(response.read(1 << 16))
    except (OSError, ValueError) as exc:
        raise OidcTokenUnavailable(f"requesting the ID token failed: {exc}") from None
    value = body.get("value") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise OidcTokenUnavailable("GitHub's answer holds no token")
    return value
