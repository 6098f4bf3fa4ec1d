"""The gateway over TLS and mutual TLS, with a real agent process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.models import BuilderSession
from circus.gateway.runtime import GatewayThread
from tests.agents.conftest import TOKEN_DIGEST, write_agent_config
from tests.agents.tls import Pki, make_pki
from tests.helpers.daemons import Daemon, circus_command, wait_until


def tls_gateway(make_settings: Callable[..., Settings], factory: sessionmaker[Session],
                pki: Pki, **tls: object) -> GatewayThread:
    settings = make_settings(queue_runner={"rpc": {
        "bind": "127.0.0.1:0", "allow_plaintext": False, "auth_tokens": [TOKEN_DIGEST],
        "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), **tls}}})
    thread = GatewayThread(settings, factory)
    thread.start()
    assert thread.started.wait(20)
    assert thread.failed is None
    return thread


def tls_agent(directory: Path, port: int, pki: Pki, *, client: tuple[Path, Path] | None,
              ca: Path | None = None, scheme: str = "tls") -> Daemon:
    config = write_agent_config(directory, port, name=directory.name)
    text = config.read_text().replace("tcp://", f"{scheme}://")
    tls_lines = [f'ca_file = "{ca or pki.ca}"', 'server_name = "localhost"']
    if client:
        tls_lines += [f'cert_file = "{client[0]}"', f'key_file = "{client[1]}"']
    # the [agent.tls] table must come before the nix_config table in the file
    text = text.replace("[agent.nix_config]", "[agent.tls]\n" + "\n".join(tls_lines) +
                        "\n[agent.nix_config]")
    config.write_text(text)
    return Daemon(directory.name, [circus_command("circus-agent"), "--config", str(config)],
                  directory)


def names(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return list(session.scalars(select(BuilderSession.name)
                                    .where(BuilderSession.connected)))


def test_tls_registration_and_plaintext_refusal(make_settings: Callable[..., Settings],
                                                committed_db: sessionmaker[Session],
                                                tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gateway = tls_gateway(make_settings, committed_db, pki)
    try:
        with tls_agent(tmp_path / "secure", gateway.port, pki, client=None):
            wait_until(lambda: names(committed_db) == ["secure"], timeout=20,
                       message="agent connected over TLS")
        # the same credentials over plain TCP never reach registration
        plain = tls_agent(tmp_path / "plain", gateway.port, pki, client=None, scheme="tcp")
        with plain:
            wait_until(lambda: plain.log().count("connection to") >= 2, timeout=20,
                       message="plain TCP attempts fail")
        assert "plain" not in names(committed_db)
        # an agent that does not trust the gateway's certificate refuses to talk
        other_ca = make_pki(tmp_path / "other-pki").ca
        distrust = tls_agent(tmp_path / "distrust", gateway.port, pki, client=None,
                             ca=other_ca)
        with distrust:
            wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in distrust.log(), timeout=20,
                       message="certificate refused")
        assert "distrust" not in names(committed_db)
    finally:
        gateway.stop()


def test_mutual_tls_with_a_pinned_common_name(make_settings: Callable[..., Settings],
                                             committed_db: sessionmaker[Session],
                                             tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gateway = tls_gateway(make_settings, committed_db, pki, client_ca=str(pki.ca),
                          require_client_cert=True, pin_cn="builder.example.org")
    try:
        with tls_agent(tmp_path / "pinned", gateway.port, pki,
                       client=(pki.client_cert, pki.client_key)):
            wait_until(lambda: names(committed_db) == ["pinned"], timeout=20,
                       message="agent with the pinned certificate connected")
        # a valid certificate of the same CA but another CN is refused at registration
        intruder = tls_agent(tmp_path / "intruder", gateway.port, pki,
                             client=(pki.other_client_cert, pki.other_client_key))
        intruder.start()
        assert intruder.process is not None
        assert intruder.process.wait(30) == 3
        assert "refused: client certificate CN does not match" in intruder.log()
        # and without any client certificate the TLS handshake itself fails
        anonymous = tls_agent(tmp_path / "anonymous", gateway.port, pki, client=None)
        with anonymous:
            wait_until(lambda: "connection to" in anonymous.log(), timeout=20,
                       message="handshake refused")
        assert sorted(names(committed_db)) == []
    finally:
        gateway.stop()
