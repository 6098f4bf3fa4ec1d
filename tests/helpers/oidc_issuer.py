"""A local stand-in for GitHub Actions' OIDC issuer, spoken over real HTTP.

Serves what Circus reads from ``token.actions.githubusercontent.com`` —
``/.well-known/openid-configuration`` and the JWKS it names — and the endpoint a
workflow job asks for its ID token (``ACTIONS_ID_TOKEN_REQUEST_URL``: GET with
``audience`` and the request token as bearer → ``{"value": <JWT>}``). Tokens are
RS256-signed by keys generated per test; claims follow GitHub's token.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

REQUEST_TOKEN = "actions-request-token"


class OidcIssuer:
    def __init__(self) -> None:
        self.keys = [RSAKey.generate_key(2048, parameters={"kid": "key-1", "use": "sig",
                                                             "alg": "RS256"})]
        #: claims the token endpoint puts into the tokens it issues
        self.job_claims: dict[str, Any] = claims_for("acme/widget")
        self.requests: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                issuer.requests.append(parts.path)
                if parts.path == "/.well-known/openid-configuration":
                    self._json({"issuer": issuer.url,
                                "jwks_uri": f"{issuer.url}/.well-known/jwks"})
                elif parts.path == "/.well-known/jwks":
                    self._json({"keys": [k.as_dict(private=False) for k in issuer.keys]})
                elif parts.path == "/token":
                    if self.headers.get("Authorization") != f"bearer {REQUEST_TOKEN}":
                        self._json({"message": "bad request token"}, 401)
                        return
                    audience = urllib.parse.parse_qs(parts.query).get("audience", [""])[0]
                    self._json({"value": issuer.token(aud=audience, **issuer.job_claims)})
                else:
                    self._json({"message": "not found"}, 404)

            def _json(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def token(self, key: RSAKey | None = None, **claims: Any) -> str:
        """A signed ID token: GitHub's claims for ``acme/widget`` unless overridden."""
        now = int(time.time())
        body = {"iss": self.url, "aud": "circus", "iat": now, "nbf": now, "exp": now + 300,
                **claims_for("acme/widget"), **claims}
        signer = key or self.keys[-1]
        return jwt.encode({"alg": "RS256", "kid": signer.kid}, body, signer)

    def rotate(self) -> RSAKey:
        key = RSAKey.generate_key(2048, parameters={"kid": f"key-{len(self.keys) + 1}",
                                                     "use": "sig", "alg": "RS256"})
        self.keys.append(key)
        return key


def claims_for(repository: str, ref: str = "refs/heads/main") -> dict[str, Any]:
    return {"repository": repository, "repository_owner": repository.split("/")[0],
            "sub": f"repo:{repository}:ref:{ref}", "ref": ref,
            "job_workflow_ref": f"{repository}/.github/workflows/ci.yml@{ref}"}


@contextmanager
def oidc_issuer() -> Iterator[OidcIssuer]:
    issuer = OidcIssuer()
    issuer.thread.start()
    try:
        yield issuer
    finally:
        issuer.server.shutdown()
        issuer.thread.join(5)
