from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from circus.common.config import ConfigError, Settings, load_settings
from circus.common.enums import PageAccess, Role


def load(raw_toml: str = "", tmp_path: Path | None = None, environ: dict[str, str] | None = None,
         ) -> Settings:
    files = []
    if raw_toml:
        assert tmp_path is not None
        path = tmp_path / "circus.toml"
        path.write_text(raw_toml)
        files.append(path)
    return load_settings(files=files, environ=environ or {})


def problems_of(raw_toml: str, tmp_path: Path, environ: dict[str, str] | None = None
                ) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load(raw_toml, tmp_path, environ)
    return [str(p) for p in excinfo.value.problems]


def test_defaults_need_no_file() -> None:
    settings = load()
    assert settings.server.port == 3000
    assert settings.queue_runner.psi_threshold == 80
    assert settings.database.url is None
    assert settings.server.access_for("home") is PageAccess.public
    assert settings.server.access_for("queue") is PageAccess.admin
    assert settings.server.access_for("project") is PageAccess.authenticated


def test_settings_are_frozen() -> None:
    settings = load()
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_layering_file_then_config_file_then_env(tmp_path: Path) -> None:
    local = tmp_path / "local.toml"
    local.write_text("[server]\nport = 4000\nhost = '0.0.0.0'\n[evaluator]\nworkers = 3\n")
    override = tmp_path / "override.toml"
    override.write_text("[server]\nport = 5000\n")
    settings = load_settings(files=[local, override],
                             environ={"CIRCUS_EVALUATOR__WORKERS": "7",
                                      "CIRCUS_QUEUE_RUNNER__RPC__BIND": "127.0.0.1:9000",
                                      "CIRCUS_QUEUE_RUNNER__RPC__AUTH_TOKENS":
                                          '["' + "a" * 64 + '"]',
                                      "CIRCUS_URL": "http://ignored", "CIRCUS_CONFIG_FILE": "x"})
    assert settings.server.port == 5000
    assert settings.server.host == "0.0.0.0"
    assert settings.evaluator.workers == 7
    assert settings.queue_runner.rpc.bind == "127.0.0.1:9000"
    assert settings.queue_runner.rpc.auth_tokens == ["a" * 64]


def test_default_file_list_reads_cwd_and_config_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "circus.toml").write_text("[server]\nport = 4100\n[gc]\nenabled = false\n")
    extra = tmp_path / "extra.toml"
    extra.write_text("[server]\nport = 4200\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={"CIRCUS_CONFIG_FILE": str(extra)})
    assert settings.server.port == 4200
    assert settings.gc.enabled is False


def test_secret_file_variants(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("postgresql://u:p@db.example/circus\n")
    (tmp_path / "key").write_text("cache.example-1:" + "A" * 88 + "\n")
    (tmp_path / "tokens").write_text(f"{'b' * 64}\n\n{'c' * 64}\n")
    (tmp_path / "pw").write_text("hunter2hunter2\n")
    settings = load(f"""
[database]
url_file = "{tmp_path / 'db'}"
[signing]
enabled = true
key_file = "{tmp_path / 'key'}"
[queue_runner.rpc]
bind = "0.0.0.0:7000"
auth_tokens_file = "{tmp_path / 'tokens'}"
[[declarative.users]]
username = "alice"
password_file = "{tmp_path / 'pw'}"
role = "admin"
""", tmp_path)
    assert settings.database.url == "postgresql://u:p@db.example/circus"
    assert settings.signing.key == "cache.example-1:" + "A" * 88
    assert settings.queue_runner.rpc.auth_tokens == ["b" * 64, "c" * 64]
    assert settings.declarative.users[0].password == "hunter2hunter2"
    assert settings.declarative.users[0].role is Role.admin


# Each case: TOML (or env), and the exact "key.path: message" expected among the problems.
INVALID: list[tuple[str, dict[str, str], str]] = [
    ("[queue_runner]\npsi_threshold = 140", {},
     "queue_runner.psi_threshold: must be between 0 and 100 (got 140)"),
    ("[server]\nport = 70000", {}, "server.port: must be between 0 and 65535 (got 70000)"),
    ("[server]\nport = 'eighty'", {}, "server.port: must be an integer (got 'eighty')"),
    ("[server]\nprot = 80", {}, "server.prot: unknown key"),
    ("[srever]\nport = 80", {}, "srever: unknown section"),
    ("[database]\nurl = 'mysql://localhost/x'", {},
     "database.url: must be a URL with scheme postgresql or postgresql+psycopg2 or postgres "
     "(got 'mysql://localhost/x')"),
    ("[broker]\nurl = 'http://localhost'", {},
     "broker.url: must be a URL with scheme redis or rediss or redis+socket or amqp or amqps "
     "or pyamqp or memory (got 'http://localhost')"),
    ("[queue_runner.rpc]\nbind = '0.0.0.0:7000'", {},
     "queue_runner.rpc.auth_tokens: must not be empty when the gateway is enabled (or set oidc)"),
    ("[queue_runner.rpc]\nbind = 'nohostport'\nauth_tokens = ['" + "a" * 64 + "']", {},
     "queue_runner.rpc.bind: must be host:port (got 'nohostport')"),
    ("[queue_runner.rpc]\nauth_tokens = ['secret']", {},
     "queue_runner.rpc.auth_tokens[0]: must be a SHA-256 hex digest"),
    ("[remote_workers]\nauth_tokens = ['" + "a" * 64 + "', 'secret']", {},
     "remote_workers.auth_tokens[1]: must be a SHA-256 hex digest"),
    ("[remote_workers]\nrate_limit = 'lots'", {},
     "remote_workers.rate_limit: must look like '10/minute' (got 'lots')"),
    ("[queue_runner.rpc.oidc]\nissuer = 'https://token.actions.githubusercontent.com'", {},
     "queue_runner.rpc.oidc.audiences: must not be empty when oidc.issuer is set"),
    ("[[queue_runner.ephemeral_pools]]\nname = 'gh'\nrepository = 'o/r'\nworkflow = 'w.yml'\n"
     "runner_url = 'tcp://runner:7000'\noidc_audience = 'circus'\ngithub_token = 't'", {},
     "queue_runner.ephemeral_pools[0].runner_url: must use TLS for GitHub pools "
     "(got 'tcp://runner:7000')"),
    ("[[queue_runner.ephemeral_pools]]\nname = 'gh'\nrepository = 'o/r'\nworkflow = 'w.yml'\n"
     "runner_url = 'tls://runner:7000'\noidc_audience = 'circus'\ngithub_token = 't'", {},
     "queue_runner.ephemeral_pools: need the gateway (rpc.bind) with rpc.oidc configured"),
    ("[queue_runner.rpc]\nbind = '0.0.0.0:7000'\n[queue_runner.rpc.oidc]\n"
     "issuer = 'https://token.actions.githubusercontent.com'\naudiences = ['circus']\n"
     "allowed_repositories = ['o/r']\n[[queue_runner.ephemeral_pools]]\nname = 'gh'\n"
     "repository = 'o/other'\nworkflow = 'w.yml'\nrunner_url = 'tls://runner:7000'\n"
     "oidc_audience = 'ci'\ngithub_token = 't'", {},
     "queue_runner.ephemeral_pools[0].oidc_audience: 'ci' is not one of rpc.oidc.audiences"),
    ("[signing]\nenabled = true", {},
     "signing.key: is required when signing.enabled (or key_file)"),
    ("[cache_upload]\nenabled = true\nstore_uri = 'file:///tmp'\n[signing]\nenabled = true\n"
     "key = 'k:abc'", {},
     "cache_upload.store_uri: must be s3://bucket[/prefix] (got 'file:///tmp')"),
    ("[cache]\ncompression = 'gzip'", {}, "cache.compression: must be 'zstd', 'xz' or 'none' "
     "(got 'gzip')"),
    ("[queue_runner]\nscheduling_strategy = 'random'", {},
     "queue_runner.scheduling_strategy: must be 'speed_factor_only', "
     "'cpu_core_count_with_speed_factor' or 'dynamic' (got 'random')"),
    ("[tracing]\nformat = 'xml'", {}, "tracing.format: must be text or json (got 'xml')"),
    ("[server.page_access]\nhomepage = 'public'", {},
     "server.page_access.homepage: unknown page (known: build, channels, evaluation, "
     "health_details, home, "
     "jobset, machines, metrics, news, project, projects, prometheus, queue, search)"),
    ("[server]\nmetrics_tokens = ['hunter2']", {},
     "server.metrics_tokens[0]: must be a SHA-256 hex digest"),
    ("[server.page_access]\nhome = 'everyone'", {},
     "server.page_access.home: must be 'public', 'authenticated' or 'admin' (got 'everyone')"),
    ("[server]\nrate_limit_api = 'lots'", {},
     "server.rate_limit_api: must look like '10/minute' (got 'lots')"),
    ("[evaluator]\nworkers = 0", {}, "evaluator.workers: must be at least 1 (got 0)"),
    ("[server.ldap]\nenabled = true\nuri = 'ldap://localhost'\nbind_dn_template = 'uid=x'", {},
     "server.ldap.bind_dn_template: must contain {username} (or set user_search_base)"),
    ("[oauth.github]\nenabled = true\nclient_id = 'abc'", {},
     "oauth.github.client_secret: is required when oauth.github.enabled"),
    ("[[declarative.projects]]\nname = 'p'\n[[declarative.projects.channels]]\nname = 'c'\n"
     "jobset = 'missing'", {},
     "declarative.projects[0].channels[0].jobset: no jobset named 'missing' in this project"),
    ("[[declarative.users]]\nusername = 'a'\n[[declarative.users]]\nusername = 'a'", {},
     "declarative.users: duplicate name 'a'"),
    ("[[declarative.api_keys]]\nname = 'k'\nkey = 'short'", {},
     "declarative.api_keys[0].key: must be at least 16 characters long (got 'short')"),
    ("", {"CIRCUS_QUEUE_RUNNER__PSI_THRESHOLD": "-5"},
     "queue_runner.psi_threshold: must be between 0 and 100 (got '-5')"),
    ("[gc]\nenabled = 'maybe'", {}, "gc.enabled: must be true or false (got 'maybe')"),
    ("[signing]\nkey_file = '/nonexistent/key'", {},
     "signing.key_file: cannot read /nonexistent/key (No such file or directory)"),
    ("[server]\nsecret_key = 'a'\nsecret_key_file = '/etc/hostname'", {},
     "server.secret_key_file: give either secret_key or secret_key_file, not both"),
]


@pytest.mark.parametrize(("raw", "environ", "expected"), INVALID,
                         ids=[case[2].split(":")[0] for case in INVALID])
def test_invalid_config_names_the_key(raw: str, environ: dict[str, str], expected: str,
                                      tmp_path: Path) -> None:
    problems = problems_of(raw, tmp_path, environ)
    assert expected in problems, problems


def test_an_unreadable_secret_file_hides_no_other_problem(tmp_path: Path) -> None:
    """A secret file is read before its table's fields are checked: a missing one
    used to be the only problem reported for its table and every table inside it."""
    problems = problems_of("""
[server]
secret_key_file = "/nonexistent/secret"
prot = 3000
[server.ldap]
bind_password_file = "/nonexistent/ldap"
tiemout = 3
[queue_runner.rpc]
auth_tokens_file = "/nonexistent/digests"
max_conections = 3
[queue_runner.rpc.tls]
cert_file = "/nonexistent/cert"
""", tmp_path)
    assert sorted(problems) == sorted([
        "server.secret_key_file: cannot read /nonexistent/secret (No such file or directory)",
        "server.prot: unknown key",
        "server.ldap.bind_password_file: cannot read /nonexistent/ldap "
        "(No such file or directory)",
        "server.ldap.tiemout: unknown key",
        "queue_runner.rpc.auth_tokens_file: cannot read /nonexistent/digests "
        "(No such file or directory)",
        "queue_runner.rpc.max_conections: unknown key",
        "queue_runner.rpc.tls.cert_file: cert_file and key_file must be set together",
        "queue_runner.rpc.tls.cert_file: file does not exist: /nonexistent/cert",
    ])


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    problems = problems_of("""
[server]
port = 70000
bogus = 1
[queue_runner]
psi_threshold = 140
workers = -1
[cache]
compression = "gzip"
[tracing]
format = "xml"
""", tmp_path)
    assert problems == [
        "server.port: must be between 0 and 65535 (got 70000)",
        "server.bogus: unknown key",
        "queue_runner.workers: must be at least 0 (got -1)",
        "queue_runner.psi_threshold: must be between 0 and 100 (got 140)",
        "cache.compression: must be 'zstd', 'xz' or 'none' (got 'gzip')",
        "tracing.format: must be text or json (got 'xml')",
    ]


def test_a_bad_key_does_not_hide_the_problems_of_a_nested_table(tmp_path: Path) -> None:
    # the report from following docs/DISTRIBUTED.md: the workers key and the token
    # digest file were wrong together, and only the first was shown
    digests = tmp_path / "digests"
    digests.write_text("not-a-digest\n")
    problems = problems_of(f"""
[queue_runner]
workers = -1
[queue_runner.rpc]
bind = "0.0.0.0:7000"
auth_tokens_file = "{digests}"
[[queue_runner.ephemeral_pools]]
name = "p"
repository = "o/r"
workflow = "w.yml"
runner_url = "tcp://ci:7000"
oidc_audience = "circus"
github_token = "t"
""", tmp_path)
    assert problems == [
        "queue_runner.workers: must be at least 0 (got -1)",
        "queue_runner.rpc.auth_tokens[0]: must be a SHA-256 hex digest",
        "queue_runner.ephemeral_pools[0].runner_url: must use TLS for GitHub pools "
        "(got 'tcp://ci:7000')",
    ]


def test_sha256sum_lines_are_accepted_as_token_digests(tmp_path: Path) -> None:
    import hashlib
    import subprocess

    token = "agent-token-" + "x" * 40
    digests = tmp_path / "digests"
    # exactly the documented commands: sha256sum's "<hex>  -" line, and the bare hex
    with digests.open("w") as handle:
        handle.write("# the build farm's agents\n")
        handle.flush()
        subprocess.run(["sh", "-c", 'printf %s "$TOKEN" | sha256sum'],
                       env={"TOKEN": token, "PATH": "/usr/bin:/bin"}, stdout=handle, check=True)
        subprocess.run(["sh", "-c", 'printf %s "$TOKEN" | sha256sum | cut -d" " -f1'],
                       env={"TOKEN": token + "2", "PATH": "/usr/bin:/bin"}, stdout=handle,
                       check=True)
    assert digests.read_text().splitlines()[1].endswith("  -")
    settings = load(f'[queue_runner.rpc]\nbind = "0.0.0.0:7000"\n'
                    f'auth_tokens_file = "{digests}"\n', tmp_path)
    assert settings.queue_runner.rpc.auth_tokens == [
        hashlib.sha256(token.encode()).hexdigest(),
        hashlib.sha256((token + "2").encode()).hexdigest()]
    from circus.gateway.auth import token_accepted

    assert token_accepted(token, settings.queue_runner.rpc.auth_tokens)
    assert not token_accepted("another", settings.queue_runner.rpc.auth_tokens)


def test_no_local_workers_is_a_valid_runner_host(tmp_path: Path) -> None:
    # agents-only or Celery-build-workers-only runner hosts
    assert load("[queue_runner]\nworkers = 0\n", tmp_path).queue_runner.workers == 0
    assert load(environ={"CIRCUS_QUEUE_RUNNER__WORKERS": "0"}).queue_runner.workers == 0


def test_error_rendering_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("[server]\nport = -1\n[evaluator]\nworkers = 0\n", tmp_path)
    text = excinfo.value.render()
    assert text.splitlines()[0] == "invalid configuration (2 problem(s)):"
    assert "  server.port: must be between 0 and 65535 (got -1)" in text
    assert "  evaluator.workers: must be at least 1 (got 0)" in text


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    problems = problems_of("[server\nport = 1", tmp_path)
    assert len(problems) == 1
    assert "circus.toml: not valid TOML" in problems[0]


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"CIRCUS_CONFIG_FILE": str(tmp_path / "nope.toml")})


def test_with_overrides_revalidates() -> None:
    settings = load()
    changed = settings.with_overrides({"server": {"port": 8080}})
    assert changed.server.port == 8080
    assert settings.server.port == 3000
    with pytest.raises(ConfigError):
        settings.with_overrides({"server": {"port": -1}})


def test_declarative_example_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "circus.example.toml"
    settings = load_settings(files=[example], environ={})
    assert settings.declarative.projects, "the example shows a declarative project"


def _dump(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def test_env_json_values_and_nested_sections() -> None:
    settings = load(environ={"CIRCUS_SERVER__ALLOWED_ORIGINS": '["https://a.example"]',
                             "CIRCUS_SERVER__LDAP__ENABLED": "false"})
    assert _dump(settings)["server"]["allowed_origins"] == ["https://a.example"]


DOCS = Path(__file__).resolve().parents[2]


def _doc_toml_blocks() -> list[tuple[str, str]]:
    """Every ```toml block of the README and docs/, as (file:line, text)."""
    import re

    blocks = []
    for doc in [DOCS / "README.md", *sorted((DOCS / "docs").glob("*.md"))]:
        text = doc.read_text()
        for match in re.finditer(r"```toml\n(.*?)```", text, re.S):
            line = text[:match.start()].count("\n") + 1
            blocks.append((f"{doc.relative_to(DOCS)}:{line}", match.group(1)))
    return blocks


def _with_secret_files(block: str, directory: Path) -> str:
    """The block with each ``*_file`` path (a production host's /run/secrets/...) made a
    file here holding a value of the right shape, so what is checked is the rest."""
    import hashlib
    import re

    from circus.common.nix.signing import generate_key_pair

    section, lines = "", []
    for number, line in enumerate(block.splitlines()):
        header = re.match(r"\s*\[+([^\]]+)\]+", line)
        if header:
            section = header.group(1)
        secret = re.match(r'(\s*)(\w+_file)(\s*=\s*)"([^"]+)"(.*)', line)
        if secret and not Path(secret.group(4)).exists():
            key = secret.group(2)
            if "digests" in secret.group(4) or key == "auth_tokens_file":
                value = hashlib.sha256(b"token").hexdigest()
            elif section == "signing":
                value = generate_key_pair("ci.example.org-1")[0]
            elif section == "database":
                value = "postgresql://circus@localhost/circus"
            elif section == "broker" or key == "broker_url_file":
                value = "redis://localhost:6379/0"
            else:
                value = "0123456789abcdef" * 4
            path = directory / f"secret-{number}"
            path.write_text(value + "\n")
            line = (f'{secret.group(1)}{key}{secret.group(3)}"{path}"{secret.group(5)}')
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("where", "block"), _doc_toml_blocks(),
                         ids=[where for where, _ in _doc_toml_blocks()])
def test_every_toml_block_of_the_docs_loads(where: str, block: str, tmp_path: Path) -> None:
    """What a reader copies from the docs is a valid config of the program it is for:
    no misspelt or retired key, no value of the wrong type (secret files aside)."""
    from circus.agent.config import load_agent_settings
    from circus.worker.config import load_worker_settings

    path = tmp_path / "block.toml"
    path.write_text(_with_secret_files(block, tmp_path))
    if "[agent]" in block:
        load_agent_settings(files=[path], environ={})
    elif "[worker]" in block:
        load_worker_settings(files=[path], environ={})
    else:
        load_settings(files=[path], environ={})
