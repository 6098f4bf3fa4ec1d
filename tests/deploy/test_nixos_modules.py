"""deploy/nixos/circus.nix, circus-agent.nix and circus-worker.nix, evaluated without nixpkgs.

The modules run against the stand-in lib/pkgs of tests/deploy/standin (documented
there); the settings files they render are loaded with Circus's own config loaders, the
validation every daemon runs at start, so a module default Circus rejects fails here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from circus.agent.config import load_agent_settings
from circus.common.config import ConfigError, Settings, load_settings
from circus.common.nix.environment import nix_environ
from circus.worker.config import WorkerSettings, load_worker_settings
from tests.deploy.nixeval import (
    AGENT_MODULE,
    CIRCUS_MODULE,
    HARDENING,
    REPO_ROOT,
    STANDIN,
    WORKER_MODULE,
    NixEvalError,
    eval_modules,
    nix_eval,
    to_toml,
)

PACKAGE = {"outPath": "/nix/store/11111111111111111111111111111111-circus-0.1.0"}
AGENT_PACKAGE = {"outPath": "/nix/store/22222222222222222222222222222222-circus-agent-0.1.0"}
WORKER_PACKAGE = {"outPath": "/nix/store/33333333333333333333333333333333-circus-worker-0.1.0"}
DAEMONS = ("circus-server", "circus-evaluator", "circus-queue-runner")
SECRET = "s3cr3t-value-that-must-not-reach-the-store"


def circus(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A user's NixOS config enabling services.circus (secrets by path under tmp_path)."""
    secret_file = tmp_path / "secret-key"
    secret_file.write_text(SECRET + "\n")
    settings = {"server": {"secret_key_file": str(secret_file)}}
    cfg: dict[str, Any] = {"enable": True, "package": PACKAGE, "settings": settings}
    for key, value in extra.items():
        if key == "settings":
            for section, body in value.items():
                settings.setdefault(section, {}).update(body)
        else:
            cfg[key] = value
    return {"services": {"circus": cfg}}


def evaluate(tmp_path: Path, user: dict[str, Any], module: Path = CIRCUS_MODULE) -> Any:
    return eval_modules(module, user, tmp_path)


def load_rendered(tmp_path: Path, rendered: dict[str, Any]) -> Settings:
    path = tmp_path / "circus.toml"
    path.write_text(to_toml(rendered))
    return load_settings(files=[path], environ={})


@pytest.fixture(scope="module")
def default_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tmp = tmp_path_factory.mktemp("nixos-default")
    return evaluate(tmp, circus(tmp)), tmp


# ---------------------------------------------------------------------------
# parse


def test_every_nix_file_parses() -> None:
    files = [p for p in REPO_ROOT.rglob("*.nix")
             if not any(part in (".venv", ".git", "node_modules") for part in p.parts)]
    assert REPO_ROOT / "flake.nix" in files
    assert CIRCUS_MODULE in files
    assert AGENT_MODULE in files
    assert WORKER_MODULE in files
    for path in files:
        proc = subprocess.run(["nix-instantiate", "--parse", str(path)], env=nix_environ([]),
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


# ---------------------------------------------------------------------------
# services.circus


def test_daemons_run_the_package_after_migrations_and_postgresql(
        default_eval: tuple[Any, Path]) -> None:
    result, _ = default_eval
    assert result["failedAssertions"] == []
    units = result["config"]["systemd"]["services"]
    assert set(units) == {*DAEMONS, "circus-migrate"}
    for name in DAEMONS:
        unit = units[name]
        assert unit["serviceConfig"]["ExecStart"] == f"{PACKAGE['outPath']}/bin/{name}"
        assert unit["serviceConfig"]["Type"] == "simple"
        for dep in ("circus-migrate.service", "postgresql.service", "redis-circus.service"):
            assert dep in unit["after"], (name, dep)
            assert dep in unit["requires"], (name, dep)
        assert "multi-user.target" in unit["wantedBy"]
        assert unit["environment"]["CIRCUS_CONFIG_FILE"] == "/etc/circus/circus.toml"
    migrate = units["circus-migrate"]
    assert migrate["serviceConfig"]["ExecStart"] == f"{PACKAGE['outPath']}/bin/circus-migrate up"
    assert migrate["serviceConfig"]["Type"] == "oneshot"
    assert migrate["serviceConfig"]["RemainAfterExit"] is True
    assert "postgresql.service" in migrate["after"]
    assert "postgresql.service" in migrate["requires"]
    assert "postgresql-setup.service" in migrate["after"]
    assert set(migrate["before"]) == {f"{d}.service" for d in DAEMONS}


def test_units_are_hardened_and_run_as_the_dedicated_user(default_eval: tuple[Any, Path]) -> None:
    result, _ = default_eval
    config = result["config"]
    for name, unit in config["systemd"]["services"].items():
        sc = unit["serviceConfig"]
        assert sc["User"] == "circus", name
        assert sc["Group"] == "circus", name
        assert sc["ProtectSystem"] == "strict", name
        assert sc["ProtectHome"] is True, name
        assert sc["PrivateTmp"] is True, name
        assert sc["NoNewPrivileges"] is True, name
        assert sc["CapabilityBoundingSet"] == "", name
        assert sc["StateDirectory"] == "circus", name
        assert sc["ReadWritePaths"] == ["/nix/var/nix/gcroots/circus"], name
        if name != "circus-migrate":
            assert sc["Restart"] == "on-failure", name
            # SIGTERM to the daemon alone: it hands back or stops its children itself
            assert sc["KillMode"] == "mixed", name
    user = config["users"]["users"]["circus"]
    assert user["isSystemUser"] is True
    assert user["group"] == "circus"
    assert "redis-circus" in user["extraGroups"]
    assert "circus" in config["users"]["groups"]
    assert config["nix"]["settings"]["trusted-users"] == ["circus"]
    assert config["nix"]["nrBuildUsers"] == 32
    assert any("/nix/var/nix/gcroots/circus" in r and "circus circus" in r
               for r in config["systemd"]["tmpfiles"]["rules"])


def test_local_postgresql_and_redis_by_default(default_eval: tuple[Any, Path]) -> None:
    result, _ = default_eval
    services = result["config"]["services"]
    pg = services["postgresql"]
    assert pg["enable"] is True
    assert pg["ensureDatabases"] == ["circus"]
    assert pg["ensureUsers"] == [{"name": "circus", "ensureDBOwnership": True}]
    redis = services["redis"]["servers"]["circus"]
    assert redis["enable"] is True
    assert redis["port"] == 0
    rendered = result["etc"]["circus/circus.toml"]
    assert rendered["database"]["url"] == "postgresql:///circus?host=/run/postgresql"
    assert rendered["broker"]["url"] == "redis+socket:///run/redis-circus/redis.sock"


def test_rendered_settings_pass_circus_validation(default_eval: tuple[Any, Path]) -> None:
    result, tmp = default_eval
    rendered = result["etc"]["circus/circus.toml"]
    settings = load_rendered(tmp, rendered)
    assert settings.database.url == "postgresql:///circus?host=/run/postgresql"
    assert settings.broker.url == "redis+socket:///run/redis-circus/redis.sock"
    assert settings.evaluator.work_dir == "/var/lib/circus/evaluator"
    assert settings.logs.log_dir == "/var/lib/circus/logs"
    assert settings.cache.cache_dir == "/var/lib/circus/cache"
    # the secret reached Circus by its path, and only the path went through Nix
    assert settings.server.secret_key == SECRET
    assert rendered["server"] == {"secret_key_file": str(tmp / "secret-key")}
    assert SECRET not in json.dumps(result)


def test_the_loader_check_fails_on_a_value_circus_rejects(tmp_path: Path) -> None:
    """The check above can fail: a rendered value Circus refuses is a ConfigError."""
    user = circus(tmp_path, settings={"database": {"url": "mysql://db.example.org/circus"},
                                      "queue_runner": {"workers": -1}})
    rendered = evaluate(tmp_path, user)["etc"]["circus/circus.toml"]
    with pytest.raises(ConfigError) as err:
        load_rendered(tmp_path, rendered)
    assert "database.url" in str(err.value)
    assert "queue_runner.workers" in str(err.value)


@pytest.mark.parametrize(("settings", "path"), [
    ({"server": {"secret_key": SECRET}}, "server.secret_key"),
    ({"evaluator": {"upload_token": SECRET}}, "evaluator.upload_token"),
    ({"signing": {"enabled": True, "key": SECRET}}, "signing.key"),
    ({"notifications": {"github_token": SECRET}}, "notifications.github_token"),
    ({"oauth": {"github": {"client_secret": SECRET}}}, "oauth.github.client_secret"),
    ({"declarative": {"api_keys": [{"name": "bot", "role": "admin", "key": SECRET}]}},
     "declarative.api_keys.0.key"),
])
def test_inline_secrets_are_refused(tmp_path: Path, settings: dict[str, Any], path: str) -> None:
    failed = evaluate(tmp_path, circus(tmp_path, settings=settings))["failedAssertions"]
    assert len(failed) == 1, failed
    assert "secrets must be given by *_file path" in failed[0]
    assert path in failed[0]


def test_password_in_database_url_is_refused(tmp_path: Path) -> None:
    user = circus(tmp_path, settings={"database": {"url": "postgresql://circus:pw@db/circus"}})
    failed = evaluate(tmp_path, user)["failedAssertions"]
    assert failed == ["services.circus.settings: a database or broker URL with a password "
                      "must be given as database.url_file / broker.url_file"]


def test_external_database_and_broker_replace_the_local_ones(tmp_path: Path) -> None:
    (tmp_path / "db-url").write_text("postgresql://circus:pw@db.example.org/circus\n")
    (tmp_path / "broker-url").write_text("redis://:pw@redis.example.org:6379/0\n")
    user = circus(tmp_path, database={"createLocally": False}, redis={"createLocally": False},
                  settings={"database": {"url_file": str(tmp_path / "db-url")},
                            "broker": {"url_file": str(tmp_path / "broker-url")}})
    result = evaluate(tmp_path, user)
    assert result["failedAssertions"] == []
    services = result["config"]["services"]
    # (the stand-in keeps a disabled top-level name as {}; NixOS has its defaults there)
    assert not services.get("postgresql")
    assert not services.get("redis")
    units = result["config"]["systemd"]["services"]
    for name in DAEMONS:
        assert units[name]["requires"] == ["circus-migrate.service"]
        assert "postgresql.service" not in units[name]["after"]
    assert "redis-circus" not in result["config"]["users"]["users"]["circus"]["extraGroups"]
    rendered = result["etc"]["circus/circus.toml"]
    assert "url" not in rendered["database"]
    assert "url" not in rendered["broker"]
    settings = load_rendered(tmp_path, rendered)
    assert settings.database.url == "postgresql://circus:pw@db.example.org/circus"
    assert settings.broker.url == "redis://:pw@redis.example.org:6379/0"


def test_no_local_database_and_no_url_is_refused(tmp_path: Path) -> None:
    failed = evaluate(tmp_path, circus(tmp_path, database={"createLocally": False}))
    assert failed["failedAssertions"] == [
        "services.circus: database.createLocally = false needs settings.database.url_file "
        "(or settings.database.url)"]


def test_oidc_and_pools_without_the_gateway_are_refused(tmp_path: Path) -> None:
    oidc = {"issuer": "https://token.actions.githubusercontent.com",
            "audiences": ["circus"], "allowed_repositories": ["acme/widget"]}
    token = tmp_path / "gh-token"
    token.write_text("ghs_x\n")
    pool = {"name": "gh", "repository": "acme/widget", "workflow": "agents.yml",
            "runner_url": "tls://ci.example.org:7000", "oidc_audience": "circus",
            "github_token_file": str(token)}

    failed = evaluate(tmp_path, circus(tmp_path, settings={"queue_runner": {
        "rpc": {"oidc": oidc}}}))["failedAssertions"]
    assert failed == ["services.circus: settings.queue_runner.rpc.oidc needs the agent gateway "
                      "(settings.queue_runner.rpc.bind)"]

    failed = evaluate(tmp_path, circus(tmp_path, settings={"queue_runner": {
        "ephemeral_pools": [pool]}}))["failedAssertions"]
    assert failed == ["services.circus: settings.queue_runner.ephemeral_pools need the agent "
                      "gateway (settings.queue_runner.rpc.bind) and OIDC "
                      "(settings.queue_runner.rpc.oidc.issuer)"]

    failed = evaluate(tmp_path, circus(tmp_path, queueRunner={"enable": False}, settings={
        "queue_runner": {"rpc": {"bind": "0.0.0.0:7000", "oidc": oidc}}}))["failedAssertions"]
    assert len(failed) == 1
    assert "enable queueRunner on this host" in failed[0]

    # the right combination passes the module and Circus's own validation
    result = evaluate(tmp_path, circus(tmp_path, settings={"queue_runner": {
        "rpc": {"bind": "0.0.0.0:7000", "oidc": oidc, "allow_plaintext": True},
        "ephemeral_pools": [pool]}}))
    assert result["failedAssertions"] == []
    settings = load_rendered(tmp_path, result["etc"]["circus/circus.toml"])
    assert settings.queue_runner.ephemeral_pools[0].github_token == "ghs_x"


def test_nginx_virtual_host(tmp_path: Path) -> None:
    result = evaluate(tmp_path, circus(tmp_path, nginx={
        "enable": True, "hostName": "ci.example.org", "enableACME": True},
        settings={"server": {"port": 3100}}))
    assert result["failedAssertions"] == []
    vhost = result["config"]["services"]["nginx"]["virtualHosts"]["ci.example.org"]
    assert vhost["forceSSL"] is True
    assert vhost["enableACME"] is True
    assert vhost["locations"]["/"]["proxyPass"] == "http://127.0.0.1:3100"
    rendered = result["etc"]["circus/circus.toml"]
    settings = load_rendered(tmp_path, rendered)
    assert settings.server.base_url == "https://ci.example.org"
    assert settings.server.force_secure_cookies is True
    assert settings.server.port == 3100

    failed = evaluate(tmp_path, circus(tmp_path, nginx={"enable": True}))["failedAssertions"]
    assert failed == ["services.circus.nginx: forceSSL needs enableACME or sslCertificate and "
                      "sslCertificateKey"]


def test_one_daemon_per_host(tmp_path: Path) -> None:
    result = evaluate(tmp_path, circus(tmp_path, evaluator={"enable": False},
                                       queueRunner={"enable": False}))
    units = result["config"]["systemd"]["services"]
    assert set(units) == {"circus-server", "circus-migrate"}
    assert units["circus-migrate"]["before"] == ["circus-server.service"]

    # a second evaluator host: workers only, the scheduler runs elsewhere
    result = evaluate(tmp_path, circus(tmp_path, server={"enable": False},
                                       queueRunner={"enable": False}, evaluator={"beat": False}))
    units = result["config"]["systemd"]["services"]
    assert set(units) == {"circus-evaluator", "circus-migrate"}
    assert units["circus-evaluator"]["serviceConfig"]["ExecStart"] == \
        f"{PACKAGE['outPath']}/bin/circus-evaluator --no-beat"


def test_a_second_evaluator_host(tmp_path: Path) -> None:
    """An evaluator-only host (issue 15 item 2, docs/INSTALL.md): `--no-beat`, the main
    host's database and broker by URL files, its own Nix store uploading .drv files to the
    server with a token by path; no PostgreSQL, Redis or server secret here."""
    for name, value in (("db-url", "postgresql://circus:pw@db.example.org/circus"),
                        ("broker-url", "redis://:pw@broker.example.org:6379/0"),
                        ("upload-token", SECRET)):
        (tmp_path / name).write_text(value + "\n")
    user = {"services": {"circus": {
        "enable": True, "package": PACKAGE, "server": {"enable": False},
        "queueRunner": {"enable": False}, "evaluator": {"beat": False},
        "database": {"createLocally": False}, "redis": {"createLocally": False},
        "settings": {
            "database": {"url_file": str(tmp_path / "db-url")},
            "broker": {"url_file": str(tmp_path / "broker-url")},
            "evaluator": {"upload_derivations_to": "https://ci.example.org",
                          "upload_token_file": str(tmp_path / "upload-token")}}}}}
    result = evaluate(tmp_path, user)
    assert result["failedAssertions"] == []
    config = result["config"]
    units = config["systemd"]["services"]
    assert set(units) == {"circus-evaluator", "circus-migrate"}
    evaluator = units["circus-evaluator"]
    assert evaluator["serviceConfig"]["ExecStart"] == \
        f"{PACKAGE['outPath']}/bin/circus-evaluator --no-beat"
    assert evaluator["requires"] == ["circus-migrate.service"]
    assert evaluator["environment"]["NIX_REMOTE"] == "daemon"
    assert not config["services"].get("postgresql")
    assert not config["services"].get("redis")
    settings = load_rendered(tmp_path, result["etc"]["circus/circus.toml"])
    assert settings.server.secret_key is None
    assert settings.database.url == "postgresql://circus:pw@db.example.org/circus"
    assert settings.evaluator.upload_derivations_to == "https://ci.example.org"
    assert settings.evaluator.upload_token == SECRET
    assert SECRET not in json.dumps(result)


def test_directories_outside_the_state_directory_are_writable(tmp_path: Path) -> None:
    result = evaluate(tmp_path, circus(tmp_path, settings={
        "logs": {"log_dir": "/srv/circus/logs"}, "gc": {"gc_roots_dir": "/nix/var/nix/gcroots/ci"},
        "cache": {"cache_dir": "/var/lib/circus/nar-cache"}}))
    for unit in result["config"]["systemd"]["services"].values():
        assert unit["serviceConfig"]["ReadWritePaths"] == [
            "/nix/var/nix/gcroots/ci", "/srv/circus/logs"]
    assert result["config"]["systemd"]["tmpfiles"]["rules"] == [
        "d /nix/var/nix/gcroots/ci 0755 circus circus - -"]


def test_disabled_module_defines_no_units(tmp_path: Path) -> None:
    user = {"services": {"circus": {"enable": False}}}
    # (package has no default, so only what a disabled module defines is evaluated)
    assert eval_modules(CIRCUS_MODULE, user, tmp_path, select="config.systemd") == {}
    assert eval_modules(CIRCUS_MODULE, user, tmp_path, select="etc") == {}


def test_option_types_are_checked(tmp_path: Path) -> None:
    with pytest.raises(NixEvalError,
                       match=r"option services\.circus\.buildUsers is not of type int"):
        evaluate(tmp_path, circus(tmp_path, buildUsers="many"))


# ---------------------------------------------------------------------------
# services.circus-agent


def agent(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    token = tmp_path / "agent-token"
    token.write_text("agent-token-value\n")
    cfg: dict[str, Any] = {"enable": True, "package": AGENT_PACKAGE,
                           "runnerUrl": "tls://ci.example.org:7000", "tokenFile": str(token),
                           "systems": ["x86_64-linux", "i686-linux"], "features": ["kvm"],
                           "maxJobs": 4}
    cfg.update(extra)
    return {"services": {"circus-agent": cfg}}


def test_agent_unit_and_rendered_settings(tmp_path: Path) -> None:
    result = evaluate(tmp_path, agent(tmp_path), AGENT_MODULE)
    assert result["failedAssertions"] == []
    config = result["config"]
    unit = config["systemd"]["services"]["circus-agent"]
    sc = unit["serviceConfig"]
    assert sc["ExecStart"] == f"{AGENT_PACKAGE['outPath']}/bin/circus-agent"
    assert sc["User"] == "circus-agent"
    assert sc["StateDirectory"] == "circus-agent"
    assert sc["ProtectSystem"] == "strict"
    assert sc["ProtectHome"] is True
    assert sc["PrivateTmp"] is True
    assert sc["NoNewPrivileges"] is True
    assert sc["CapabilityBoundingSet"] == ""
    assert sc["Restart"] == "on-failure"
    # the drain: SIGTERM to the agent alone, not to the nix-store clients of its builds
    assert sc["KillMode"] == "mixed"
    assert "nix-daemon.service" in unit["after"]
    assert "nix-daemon.service" in unit["requires"]
    assert unit["environment"]["CIRCUS_AGENT_CONFIG_FILE"] == "/etc/circus/agent.toml"
    assert config["nix"]["settings"]["trusted-users"] == ["circus-agent"]
    rendered = result["etc"]["circus/agent.toml"]
    assert "auth_token" not in rendered["agent"]
    path = tmp_path / "agent.toml"
    path.write_text(to_toml(rendered))
    settings = load_agent_settings(files=[path], environ={}).agent
    assert settings.runner_url == "tls://ci.example.org:7000"
    assert settings.auth_token == "agent-token-value"
    assert settings.systems == ["x86_64-linux", "i686-linux"]
    assert settings.features == ["kvm"]
    assert settings.max_jobs == 4
    assert settings.work_dir == "/var/lib/circus-agent"


def test_agent_with_oidc_and_mutual_tls(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    result = evaluate(tmp_path, agent(tmp_path, tokenFile=None, oidcAudience="circus", tls={
        "caFile": str(tmp_path / "ca.pem"), "certFile": str(tmp_path / "cert.pem"),
        "keyFile": str(tmp_path / "key.pem")}), AGENT_MODULE)
    assert result["failedAssertions"] == []
    path = tmp_path / "agent.toml"
    path.write_text(to_toml(result["etc"]["circus/agent.toml"]))
    settings = load_agent_settings(files=[path], environ={}).agent
    assert settings.oidc_audience == "circus"
    assert settings.auth_token is None
    assert settings.tls.cert_file == str(tmp_path / "cert.pem")


@pytest.mark.parametrize(("extra", "message"), [
    ({"tokenFile": None}, "set exactly one of tokenFile and oidcAudience"),
    ({"oidcAudience": "circus"}, "set exactly one of tokenFile and oidcAudience"),
    ({"settings": {"agent": {"auth_token": "inline"}}}, "must be given by tokenFile"),
    ({"tls": {"certFile": "/run/secrets/agent.pem"}}, "tls.certFile and tls.keyFile"),
    ({"runnerUrl": "https://ci.example.org"}, "runnerUrl must be tls://host:port"),
    ({"runnerUrl": "tcp://ci.example.org:7000"}, "would travel in clear"),
])
def test_agent_bad_combinations_are_refused(tmp_path: Path, extra: dict[str, Any],
                                            message: str) -> None:
    failed = evaluate(tmp_path, agent(tmp_path, **extra), AGENT_MODULE)["failedAssertions"]
    assert len(failed) == 1, failed
    assert message in failed[0], failed


# ---------------------------------------------------------------------------
# services.circus-worker

CACHE_KEY = "ci.example.org-1:" + "A" * 43 + "="
WORKER_SECRET = "worker-token-that-must-not-reach-the-store"


def worker(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    token = tmp_path / "worker-token"
    token.write_text(WORKER_SECRET + "\n")
    cfg: dict[str, Any] = {"enable": True, "package": WORKER_PACKAGE,
                           "serverUrl": "https://ci.example.org", "tokenFile": str(token),
                           "brokerUrl": "redis://broker.example.org:6379/0",
                           "systems": ["x86_64-linux", "i686-linux"], "features": ["kvm"],
                           "slots": 4}
    cfg.update(extra)
    return {"services": {"circus-worker": cfg}}


def load_worker(tmp_path: Path, result: Any) -> WorkerSettings:
    path = tmp_path / "worker.toml"
    path.write_text(to_toml(result["etc"]["circus/worker.toml"]))
    return load_worker_settings(files=[path], environ={})


def test_worker_unit_runs_the_package_hardened(tmp_path: Path) -> None:
    result = evaluate(tmp_path, worker(tmp_path), WORKER_MODULE)
    assert result["failedAssertions"] == []
    config = result["config"]
    unit = config["systemd"]["services"]["circus-worker"]
    sc = unit["serviceConfig"]
    assert sc["ExecStart"] == f"{WORKER_PACKAGE['outPath']}/bin/circus-worker"
    assert sc["Type"] == "simple"
    assert sc["User"] == sc["Group"] == "circus-worker"
    assert sc["StateDirectory"] == "circus-worker"
    assert "ReadWritePaths" not in sc
    # every key of the shared hardening, unchanged
    hardening = nix_eval(f"import {HARDENING}", tmp_path)
    assert {key: sc[key] for key in hardening} == hardening
    assert sc["ProtectSystem"] == "strict"
    assert sc["NoNewPrivileges"] is True
    assert sc["CapabilityBoundingSet"] == ""
    # SIGTERM to the worker alone: it stops its builds and hands their steps back
    assert sc["KillSignal"] == "SIGTERM"
    assert sc["KillMode"] == "mixed"
    assert sc["Restart"] == "on-failure"
    assert unit["environment"] == {"CIRCUS_WORKER_CONFIG_FILE": "/etc/circus/worker.toml",
                                   "NIX_REMOTE": "daemon"}
    assert "nix-daemon.service" in unit["after"]
    assert "nix-daemon.service" in unit["requires"]
    assert "network-online.target" in unit["after"]
    assert "multi-user.target" in unit["wantedBy"]
    user = config["users"]["users"]["circus-worker"]
    assert user["isSystemUser"] is True
    assert user["group"] == "circus-worker"
    assert "circus-worker" in config["users"]["groups"]
    # no pinned key: the daemon accepts the server's key from the worker as a trusted user;
    # the daemon offers the worker's features (its own --option would be ignored untrusted)
    assert config["nix"]["settings"] == {"trusted-users": ["circus-worker"],
                                         "trusted-public-keys": [],
                                         "extra-system-features": ["kvm"]}


def test_worker_rendered_settings_pass_the_workers_validation(tmp_path: Path) -> None:
    result = evaluate(tmp_path, worker(tmp_path, name="builder-1", settings={
        "nix": {"config": {"max-jobs": "4"}}, "tracing": {"format": "json"}}), WORKER_MODULE)
    assert result["failedAssertions"] == []
    rendered = result["etc"]["circus/worker.toml"]
    assert "token" not in rendered["worker"]
    assert rendered["worker"]["token_file"] == str(tmp_path / "worker-token")
    assert WORKER_SECRET not in json.dumps(result)
    settings = load_worker(tmp_path, result)
    assert settings.worker.server_url == "https://ci.example.org"
    assert settings.worker.token == WORKER_SECRET
    assert settings.worker.broker_url == "redis://broker.example.org:6379/0"
    assert settings.worker.name == "builder-1"
    assert settings.worker.systems == ["x86_64-linux", "i686-linux"]
    assert settings.worker.features == ["kvm"]
    assert settings.worker.slots == 4
    assert settings.worker.work_dir == "/var/lib/circus-worker"
    assert settings.nix.config == {"max-jobs": "4"}
    assert settings.tracing.format == "json"


def test_worker_broker_url_with_a_password_comes_from_a_file(tmp_path: Path) -> None:
    broker = tmp_path / "broker-url"
    broker.write_text("amqp://circus:broker-pw@mq.example.org:5672//\n")
    result = evaluate(tmp_path, worker(tmp_path, brokerUrl=None, brokerUrlFile=str(broker)),
                      WORKER_MODULE)
    assert result["failedAssertions"] == []
    assert "broker-pw" not in json.dumps(result)
    settings = load_worker(tmp_path, result)
    assert settings.worker.broker_url == "amqp://circus:broker-pw@mq.example.org:5672//"


def test_worker_cache_key_pin_goes_to_the_daemon_not_trust(tmp_path: Path) -> None:
    result = evaluate(tmp_path, worker(tmp_path, cachePublicKey=CACHE_KEY), WORKER_MODULE)
    assert result["failedAssertions"] == []
    assert result["config"]["nix"]["settings"] == {"trusted-users": [],
                                                   "trusted-public-keys": [CACHE_KEY],
                                                   "extra-system-features": ["kvm"]}
    assert result["etc"]["circus/worker.toml"]["worker"]["cache_public_key"] == CACHE_KEY
    # trust can still be asked for (the worker's [nix] settings then apply)
    trusted = evaluate(tmp_path, worker(tmp_path, cachePublicKey=CACHE_KEY, trustedUser=True),
                       WORKER_MODULE)
    assert trusted["config"]["nix"]["settings"]["trusted-users"] == ["circus-worker"]
    assert load_worker(tmp_path, result).worker.cache_public_key == CACHE_KEY


def test_worker_without_features_adds_none_to_the_daemon(tmp_path: Path) -> None:
    result = evaluate(tmp_path, worker(tmp_path, features=[], mandatoryFeatures=[]),
                      WORKER_MODULE)
    assert "extra-system-features" not in result["config"]["nix"]["settings"]
    result = evaluate(tmp_path, worker(tmp_path, features=[], mandatoryFeatures=["gpu"]),
                      WORKER_MODULE)
    assert result["config"]["nix"]["settings"]["extra-system-features"] == ["gpu"]
    assert load_worker(tmp_path, result).worker.mandatory_features == ["gpu"]


def test_worker_work_dir_elsewhere_is_writable(tmp_path: Path) -> None:
    result = evaluate(tmp_path, worker(tmp_path, settings={
        "worker": {"work_dir": "/srv/circus-worker"}}), WORKER_MODULE)
    unit = result["config"]["systemd"]["services"]["circus-worker"]
    assert unit["serviceConfig"]["ReadWritePaths"] == ["/srv/circus-worker"]
    assert load_worker(tmp_path, result).worker.work_dir == "/srv/circus-worker"


@pytest.mark.parametrize(("extra", "message"), [
    ({"tokenFile": None}, "set tokenFile"),
    ({"settings": {"worker": {"token": WORKER_SECRET}}}, "must be given by tokenFile"),
    ({"serverUrl": "tls://ci.example.org:7000"}, "serverUrl must be an http(s) URL"),
    ({"serverUrl": "ci.example.org"}, "serverUrl must be an http(s) URL"),
    ({"brokerUrl": None}, "set exactly one of brokerUrl and brokerUrlFile"),
    ({"brokerUrlFile": "/run/secrets/broker-url"},
     "set exactly one of brokerUrl and brokerUrlFile"),
    ({"brokerUrl": "redis://:pw@broker.example.org:6379/0"}, "must be given by brokerUrlFile"),
    ({"brokerUrl": None, "brokerUrlFile": "/run/secrets/broker-url",
      "settings": {"worker": {"broker_url": "amqp://circus:pw@mq.example.org//"}}},
     "must be given by brokerUrlFile"),
])
def test_worker_bad_combinations_are_refused(tmp_path: Path, extra: dict[str, Any],
                                             message: str) -> None:
    failed = evaluate(tmp_path, worker(tmp_path, **extra), WORKER_MODULE)["failedAssertions"]
    assert len(failed) == 1, failed
    assert message in failed[0], failed


def test_worker_token_as_a_nix_path_literal_is_refused(tmp_path: Path) -> None:
    """`tokenFile = ./token` would put the token into the store when the settings are
    rendered (a path literal is copied there); only a path string may be given."""
    token = tmp_path / "worker-token"
    token.write_text(WORKER_SECRET + "\n")
    expr = (f"(import {STANDIN}/eval.nix {{ modules = [ {WORKER_MODULE} args "
            f"{{ services.circus-worker.tokenFile = {token}; }} ]; }}).failedAssertions")
    user = worker(tmp_path)
    del user["services"]["circus-worker"]["tokenFile"]
    failed = nix_eval(expr, tmp_path, user)
    assert len(failed) == 1, failed
    assert "must be path strings" in failed[0]


def test_worker_loader_refuses_what_the_module_lets_through(tmp_path: Path) -> None:
    """The rendered file is checked by the worker's own loader: a value the module does
    not know about (here slots = 0 through settings) is a ConfigError with its key."""
    result = evaluate(tmp_path, worker(tmp_path, settings={"worker": {"slots": 0}}),
                      WORKER_MODULE)
    assert result["failedAssertions"] == []
    with pytest.raises(ConfigError) as err:
        load_worker(tmp_path, result)
    assert "worker.slots" in str(err.value)


def test_disabled_worker_module_defines_nothing(tmp_path: Path) -> None:
    user = {"services": {"circus-worker": {"enable": False}}}
    assert eval_modules(WORKER_MODULE, user, tmp_path, select="config.systemd") == {}
    assert eval_modules(WORKER_MODULE, user, tmp_path, select="etc") == {}
