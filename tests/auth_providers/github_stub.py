"""A local HTTP server speaking GitHub's OAuth web flow and the bits of its REST API
that a login reads (GitHub is a SaaS: this is the one stub the tests allow).

- ``GET /login/oauth/authorize``: checks ``client_id``, ``response_type``; "the
  user approves" at once: 302 to ``redirect_uri`` with a one-time ``code`` and the
  ``state`` it was given (or ``error=access_denied`` when ``deny`` is set).
- ``POST /login/oauth/access_token``: checks client id and secret (form body, as
  GitHub documents), the code (single use, same ``redirect_uri``); answers like
  GitHub: HTTP 200 with ``{"error": ...}`` on failure.
- ``GET /api/user``, ``/api/user/emails``: need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

CLIENT_ID = "circus-test-client"
CLIENT_SECRET = "circus-test-client-secret"


@dataclass
class GithubAccount:
    id: int
    login: str
    name: str | None = None
    #: the public email on the profile (None: private, only in /user/emails)
    email: str | None = None
    emails: list[dict[str, Any]] = field(default_factory=list)
    #: organizations (logins) the user belongs to, as /user/orgs lists them
    orgs: list[str] = field(default_factory=list)


@dataclass
class StubState:
    #: who is "logged in at GitHub" and approves the next authorization
    account: GithubAccount | None = None
    deny: bool = False
    #: answer the token request with this OAuth error (GitHub's 200 + error body)
    token_error: str | None = None
    #: answer the token request with this HTTP status and a non-JSON body
    token_status: int | None = None
    codes: dict[str, tuple[GithubAccount, str]] = field(default_factory=dict)
    tokens: dict[str, GithubAccount] = field(default_factory=dict)
    #: every request: (method, path)
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: the parameters of every authorize request
    authorizations: list[dict[str, str]] = field(default_factory=list)


class GithubStub:
    def __init__(self) -> None:
        self.state = StubState()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stub._get(self)

            def do_POST(self) -> None:
                stub._post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> GithubStub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self, account: GithubAccount | None = None) -> None:
        self.state = StubState(account=account)

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The ``oauth.github`` section pointing at this stub."""
        return {"enabled": True, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "authorize_url": f"{self.url}/login/oauth/authorize",
                "access_token_url": f"{self.url}/login/oauth/access_token",
                "api_url": f"{self.url}/api", **extra}

    # -- handlers

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        self.state.requests.append(("GET", parts.path))
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/login/oauth/authorize":
            self._authorize(handler, query)
        elif parts.path in ("/api/user", "/api/user/emails", "/api/user/orgs"):
            token = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            account = self.state.tokens.get(token)
            if account is None:
                self._json(handler, 401, {"message": "Bad credentials"})
            elif parts.path == "/api/user":
                self._json(handler, 200, {"id": account.id, "login": account.login,
                                          "name": account.name, "email": account.email,
                                          "type": "User"})
            elif parts.path == "/api/user/orgs":
                self._json(handler, 200, [{"login": org, "id": i}
                                          for i, org in enumerate(account.orgs)])
            else:
                self._json(handler, 200, account.emails)
        else:
            self._json(handler, 404, {"message": "Not Found"})

    def _authorize(self, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        self.state.authorizations.append(query)
        if query.get("client_id") != CLIENT_ID or query.get("response_type") != "code":
            self._json(handler, 400, {"error": "bad authorize request"})
            return
        redirect_uri, state = query.get("redirect_uri", ""), query.get("state", "")
        if self.state.deny or self.state.account is None:
            params = {"error": "access_denied", "error_description": "The user has denied "
                      "your application access.", "state": state}
        else:
            code = secrets.token_hex(10)
            self.state.codes[code] = (self.state.account, redirect_uri)
            params = {"code": code, "state": state}
        handler.send_response(302)
        handler.send_header("Location", f"{redirect_uri}?{urlencode(params)}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        self.state.requests.append(("POST", parts.path))
        length = int(handler.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(handler.rfile.read(length).decode()).items()}
        if parts.path != "/login/oauth/access_token":
            self._json(handler, 404, {"message": "Not Found"})
            return
        if self.state.token_status is not None:
            body = b"<html>GitHub is down</html>"
            handler.send_response(self.state.token_status)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        if self.state.token_error is not None:
            self._json(handler, 200, {"error": self.state.token_error})
            return
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            self._json(handler, 200, {"error": "incorrect_client_credentials"})
            return
        found = self.state.codes.pop(form.get("code", ""), None)
        if found is None or found[1] != form.get("redirect_uri"):
            self._json(handler, 200, {"error": "bad_verification_code"})
            return
        token = "gho_" + secrets.token_hex(16)
        self.state.tokens[token] = found[0]
        self._json(handler, 200, {"access_token": token, "token_type": "bearer",
                                  "scope": "read:user,user:email"})

    @staticmethod
    def _json(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
