"""The remote worker's config file: every problem listed, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from celeryconfig import common_celery_settings
from circus.common.configbase import ConfigError
from circus.worker.config import load_worker_settings
from circus.worker.main import RemoteWorkerDaemon, main


def test_the_token_comes_from_a_file_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    config = tmp_path / "worker.toml"
    config.write_text(f"""
[worker]
server_url = "https://ci.example.org"
token_file = "{tmp_path / 'token'}"
broker_url = "amqp://broker.example.org//"
features = ["kvm"]
""")
    settings = load_worker_settings([config], environ={})
    assert settings.worker.token == "s3cret-token"
    assert settings.worker.slots == 1
    assert settings.nix.sandbox is True


def test_every_problem_is_listed(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("""
[worker]
server_url = "ftp://ci.example.org"
broker_url = "redis://localhost"
[nix]
sandbox_paths = ["relative/path"]
""")
    with pytest.raises(ConfigError) as raised:
        load_worker_settings([config], environ={})
    rendered = raised.value.render()
    for key in ("worker.server_url", "worker.token", "nix.sandbox_paths.0"):
        assert key in rendered, rendered


def test_a_worker_needs_a_slot(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nserver_url = "http://s"\ntoken = "t"\nbroker_url = "redis://b"\n'
                      "slots = 0\n")
    with pytest.raises(ConfigError, match=r"worker.slots: must be at least 1 \(got 0\)"):
        load_worker_settings([config], environ={})


def test_a_bad_config_exits_2_with_every_problem(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nserver_url = "ftp://s"\nbroker_url = "redis://b"\n')
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config), "--log-level", "debug"])
    assert exited.value.code == 2
    problems = capsys.readouterr().err
    for key in ("worker.server_url", "worker.token"):
        assert key in problems, problems


@pytest.mark.parametrize(("broker_url", "transport_options"), [
    ("amqp://broker.example.org//", {}),
    ("redis://broker.example.org/0", {"visibility_timeout": 6 * 3600})])
def test_the_workers_celery_app_has_the_daemons_broker_settings(
        tmp_path: Path, broker_url: str, transport_options: dict[str, int]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[worker]\nserver_url = "http://s"\ntoken = "t"\n'
                      f'broker_url = "{broker_url}"\n')
    conf = RemoteWorkerDaemon(load_worker_settings([config], environ={})).app.conf
    # visibility_timeout is Redis' own; the rest as every daemon has it
    assert conf.broker_transport_options == transport_options
    for key, value in common_celery_settings(broker_url).items():
        assert conf[key] == value, key


def _nix_public_key(name: str) -> str:
    import base64
    import os

    return f"{name}:{base64.b64encode(os.urandom(32)).decode()}"


def test_a_pinned_worker_refuses_a_server_announcing_another_cache_key(
        tmp_path: Path, redis_url: str) -> None:
    """Whoever answers at the server's address (a hijacked name, a proxy, a compromised
    front end) and announces a signing key of its own gets no worker that would take
    inputs signed by it: the worker with a pinned key exits 2 naming both keys. With
    the pinned key announced, the same worker starts."""
    import json
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.helpers.daemons import wait_until
    from tests.helpers.worker_hosts import worker_command, worker_env

    pinned = _nix_public_key("ci.example.org-1")
    announced = {"key": _nix_public_key("attacker")}

    class Impostor(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"classes": ["x86_64-linux"], "lease_secs": 60,
                               "cache_public_key": announced["key"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "worker.toml"
    config.write_text(f"""
[worker]
name = "pinned"
server_url = "http://127.0.0.1:{server.server_address[1]}"
token = "t0ken-of-the-worker"
broker_url = "{redis_url}"
work_dir = "{tmp_path / 'work'}"
cache_public_key = "{pinned}"
""")
    try:
        refused = subprocess.run(worker_command(config), env=worker_env(), timeout=120,
                                 capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr
        assert announced["key"] in refused.stderr
        assert "pinned worker.cache_public_key" in refused.stderr
        assert not (tmp_path / "work" / "netrc").exists()   # no credentials written for it

        # control: the same worker, the pinned key announced, gets past the check
        announced["key"] = pinned
        log = tmp_path / "accepted.log"
        with log.open("w") as output:
            accepted = subprocess.Popen(worker_command(config), env=worker_env(),
                                        stdout=output, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: "1 slot(s)" in log.read_text() or accepted.poll() is not None,
                           timeout=120, message="the worker past the key check")
                assert "1 slot(s)" in log.read_text(), log.read_text()
                assert (tmp_path / "work" / "netrc").exists()
            finally:
                accepted.kill()
                accepted.wait(30)
    finally:
        server.shutdown()


def test_a_malformed_pinned_key_is_a_config_problem(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nserver_url = "http://s"\ntoken = "t"\nbroker_url = "redis://b"\n'
                      'cache_public_key = "no-colon-here"\n')
    with pytest.raises(ConfigError, match=r"worker.cache_public_key: must be a Nix public key"):
        load_worker_settings([config], environ={})
