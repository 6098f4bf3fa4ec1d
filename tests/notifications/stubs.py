"""Local stand-ins for the SaaS endpoints notifications talk to, and a real SMTP server.

``HttpStub`` speaks plain HTTP like the GitHub/Gitea/GitLab status APIs, Slack's
incoming webhooks and any JSON webhook receiver do at the level Circus uses
them: it records every request and answers 201 (or what a rule says).
``SmtpSink`` is aiosmtpd, optionally with STARTTLS or implicit TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers.net import free_port


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Rule:
    prefix: str
    status: int
    remaining: int | None


class HttpStub:
    """An HTTP server on a free port recording requests; rules pick error answers."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                parts = urlsplit(self.path)
                status = stub._status_for(parts.path)
                with stub._lock:
                    stub.requests.append(Recorded(
                        "POST", parts.path, parse_qs(parts.query),
                        {k.lower(): v for k, v in self.headers.items()}, body,
                        time.monotonic(), status))
                answer = json.dumps({"ok": status < 400} if status < 400 else
                                    {"message": "stub failure"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def start(self) -> HttpStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, prefix: str, status: int, times: int | None = None) -> None:
        """Answer ``status`` to paths under ``prefix`` (``times`` times, or always)."""
        with self._lock:
            self._rules.insert(0, _Rule(prefix, status, times))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def _status_for(self, path: str) -> int:
        with self._lock:
            for rule in self._rules:
                if path.startswith(rule.prefix) and (rule.remaining is None or
                                                     rule.remaining > 0):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule.status
        return 201

    def under(self, prefix: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def wait_for(self, predicate: Callable[[list[Recorded]], bool], timeout: float = 30.0,
                 what: str = "requests") -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                seen = list(self.requests)
            if predicate(seen):
                return seen
            time.sleep(0.05)
        raise AssertionError(f"stub did not see {what} within {timeout}s; got "
                             f"{[(r.path, r.body[:200]) for r in self.requests]}")


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: Message
    tls: bool


@dataclass
class _Handler:
    received: list[Mail] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(Mail(envelope.mail_from, list(envelope.rcpt_tos),
                                  message_from_bytes(envelope.original_content or
                                                     envelope.content),
                                  session.ssl is not None))
        return "250 OK"


class SmtpSink:
    """aiosmtpd on a free port: plain, STARTTLS (required) or implicit TLS."""

    def __init__(self, *, starttls: ssl.SSLContext | None = None,
                 implicit_tls: ssl.SSLContext | None = None) -> None:
        self.handler = _Handler()
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if starttls is not None:
            kwargs.update(tls_context=starttls, require_starttls=True)
        if implicit_tls is not None:
            kwargs.update(ssl_context=implicit_tls)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     ready_timeout=10, **kwargs)

    @property
    def received(self) -> list[Mail]:
        return self.handler.received

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@dataclass(frozen=True)
class ServerCert:
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_server_cert(directory: Path) -> ServerCert:
    """A self-signed certificate for 127.0.0.1/localhost (the client trusts it as CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "smtp.crt", directory / "smtp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ServerCert(cert_file, key_file)


def running(stub: HttpStub) -> Iterator[HttpStub]:
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()
