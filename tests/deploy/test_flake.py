"""flake.nix: its `outputs` called with stand-in inputs (tests/deploy/standin/flake.nix).

Nothing is built: buildPythonApplication of the stand-in keeps its arguments, so the
tests check which nixpkgs Python packages each package asks for against setup.cfg and
against what circus.agent and circus.worker really import.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.nixeval import REPO_ROOT, STANDIN, nix_eval

SYSTEMS = ["aarch64-linux", "x86_64-linux"]
FLAKE = f"(import {STANDIN}/flake.nix {{ root = {REPO_ROOT}; }})"
#: the agent's dependencies (and nothing of the server's database, LDAP, Celery or Flask)
AGENT_DEPS = {"pycapnp", "pydantic", "zstandard"}
SERVER_ONLY = {"celery", "redis", "kombu", "flask", "flask-smorest", "sqlalchemy", "alembic",
               "psycopg2", "fabric", "boto3", "python-ldap", "gunicorn", "flask-login",
               "prometheus-flask-exporter", "flask-limiter", "flask-cors", "flask-wtf",
               "authlib", "argon2-cffi", "joserfc", "requests", "cryptography"}
#: import name -> nixpkgs attribute, for the imports of circus.agent
IMPORT_TO_NIXPKGS = {"capnp": "pycapnp", "pydantic": "pydantic", "cryptography": "cryptography",
                     "zstandard": "zstandard", "joserfc": "joserfc", "requests": "requests",
                     "annotated_types": "pydantic", "pydantic_core": "pydantic",
                     "typing_extensions": "pydantic", "typing_inspection": "pydantic"}
#: modules of the server's libraries that must not be imported by the agent
SERVER_IMPORTS = {"flask", "sqlalchemy", "psycopg2", "ldap", "celery", "kombu", "redis",
                  "boto3", "fabric", "alembic", "gunicorn", "werkzeug", "authlib", "argon2"}
#: the remote Celery worker's dependencies: Celery, its Redis transport (redis, and
#: packaging, which kombu's redis transport imports; kombu brings amqp for RabbitMQ),
#: requests for the server's API, pydantic for its config
WORKER_DEPS = {"celery", "kombu", "redis", "packaging", "requests", "pydantic"}
#: the database, web, LDAP, S3 and SSH libraries the worker host does without
WORKER_FORBIDDEN_DEPS = SERVER_ONLY - WORKER_DEPS
WORKER_FORBIDDEN_IMPORTS = SERVER_IMPORTS - {"celery", "kombu", "redis"}
#: import name -> nixpkgs attribute for what circus.worker loads, Celery's and requests'
#: own dependencies included (nixpkgs' celery, kombu and requests bring them); None:
#: optional, imported inside try/except by the library (greenlet by celery.utils.threads,
#: yaml by kombu.serialization, cffi by billiard.util, cryptography by redis.utils),
#: absent in the lean package
WORKER_IMPORT_TO_NIXPKGS: dict[str, str | None] = {
    "celery": "celery", "billiard": "celery", "click": "celery", "click_didyoumean": "celery",
    "click_plugins": "celery", "click_repl": "celery", "dateutil": "celery", "six": "celery",
    "tzlocal": "celery", "prompt_toolkit": "celery", "wcwidth": "celery",
    "kombu": "kombu", "amqp": "kombu", "vine": "kombu", "tzdata": "kombu",
    "redis": "redis", "async_timeout": "redis", "packaging": "packaging",
    "requests": "requests", "urllib3": "requests", "idna": "requests", "certifi": "requests",
    "charset_normalizer": "requests",
    "pydantic": "pydantic", "pydantic_core": "pydantic", "annotated_types": "pydantic",
    "typing_extensions": "pydantic", "typing_inspection": "pydantic",
    "greenlet": None, "yaml": None, "cffi": None, "cryptography": None,
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("flake")
    expr = f"""
      let
        f = {FLAKE};
        o = f.self;
        names = builtins.attrNames;
        deps = p: map (d: d.pname) p.standInArgs.dependencies;
        per = attr: builtins.mapAttrs (_: names) o.${{attr}};
        lean = name: let args = o.packages.x86_64-linux.${{name}}.standInArgs; in {{
          inherit (args) pname dontCheckRuntimeDeps postInstall pythonImportsCheck
            makeWrapperArgs;
          mainProgram = args.meta.mainProgram;
        }};
      in {{
        description = f.flake.description;
        nixpkgsUrl = f.flake.inputs.nixpkgs.url;
        top = names (removeAttrs o [ "outPath" ]);
        packages = per "packages";
        apps = per "apps";
        devShells = per "devShells";
        checks = per "checks";
        nixosModules = names o.nixosModules;
        circusDeps = deps o.packages.x86_64-linux.circus;
        agentDeps = deps o.packages.x86_64-linux.circus-agent;
        workerDeps = deps o.packages.x86_64-linux.circus-worker;
        agentArgs = lean "circus-agent";
        workerArgs = lean "circus-worker";
        circusArgs = {{
          inherit (o.packages.x86_64-linux.circus.standInArgs) pname version dontCheckRuntimeDeps
            pythonImportsCheck;
        }};
        circusPath = o.packages.x86_64-linux.circus.outPath;
        agentPath = o.packages.x86_64-linux.circus-agent.outPath;
        workerPath = o.packages.x86_64-linux.circus-worker.outPath;
        programs = builtins.mapAttrs (_: a: a.program) o.apps.x86_64-linux;
        appTypes = builtins.mapAttrs (_: a: a.type) o.apps.aarch64-linux;
      }}
    """
    return nix_eval(expr, tmp)


def test_outputs_have_the_expected_shape(outputs: Any) -> None:
    assert outputs["nixpkgsUrl"].startswith("github:NixOS/nixpkgs/")
    assert set(outputs["top"]) == {"packages", "apps", "devShells", "nixosModules", "checks"}
    for attr in ("packages", "apps", "devShells", "checks"):
        assert sorted(outputs[attr]) == SYSTEMS, attr
    for system in SYSTEMS:
        assert set(outputs["packages"][system]) == {"circus", "circus-agent", "circus-worker",
                                                    "default"}
        assert set(outputs["devShells"][system]) == {"default"}
        assert set(outputs["checks"][system]) == {"circus", "circus-agent", "circus-worker",
                                                  "modules", "second-evaluator"}
        assert {"default", "circus-server", "circus-agent", "circus-worker"} <= \
            set(outputs["apps"][system])
    assert set(outputs["nixosModules"]) == {"circus", "circus-agent", "circus-worker", "default"}


def test_apps_run_the_packages(outputs: Any) -> None:
    programs = outputs["programs"]
    assert programs["circus-server"] == f"{outputs['circusPath']}/bin/circus-server"
    assert programs["default"] == f"{outputs['circusPath']}/bin/circus"
    assert programs["circus-agent"] == f"{outputs['agentPath']}/bin/circus-agent"
    assert programs["circus-worker"] == f"{outputs['workerPath']}/bin/circus-worker"
    assert set(outputs["appTypes"].values()) == {"app"}


def _requirement_names() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    names = set()
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~ ]", line)[0].lower())
    return names


def test_circus_package_brings_every_install_requirement(outputs: Any) -> None:
    args = outputs["circusArgs"]
    assert {k: args[k] for k in ("pname", "version", "dontCheckRuntimeDeps")} == {
        "pname": "circus", "version": "0.1.0", "dontCheckRuntimeDeps": False}
    assert "circus.worker.main" in args["pythonImportsCheck"]
    # nixpkgs calls the PyPI packages by their lower-case names
    assert _requirement_names() == set(outputs["circusDeps"])


def test_agent_package_is_lean(outputs: Any) -> None:
    assert set(outputs["agentDeps"]) == AGENT_DEPS
    assert not SERVER_ONLY & set(outputs["agentDeps"])
    args = outputs["agentArgs"]
    assert args["pname"] == "circus-agent"
    assert args["mainProgram"] == "circus-agent"
    # setup.cfg lists the server's libraries too: pip's check would refuse the lean set
    assert args["dontCheckRuntimeDeps"] is True
    assert "! -name circus-agent -delete" in args["postInstall"]
    assert args["pythonImportsCheck"] == ["circus.agent.main"]


def _third_party_imports(code: str) -> set[str]:
    """The top-level third-party modules loaded by ``code`` in a fresh interpreter."""
    code += ("\nimport sys\n"
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules}\n"
             "                      - set(sys.stdlib_module_names))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return {m for m in proc.stdout.split()
            if m not in {"circus", "celeryconfig", "__main__", "__mp_main__", "cython_runtime",
                         "_distutils_hack"}
            and not m.startswith(("_cython_", "_sysconfigdata_", "__editable__"))}


def test_agent_package_covers_what_the_agent_imports(outputs: Any) -> None:
    """Import every module of circus.agent (and what it loads lazily) in a fresh
    interpreter: each third-party module must come from the agent package's dependencies."""
    imported = _third_party_imports(
        "import pkgutil, importlib, circus.agent, circus.protocol\n"
        "for m in pkgutil.walk_packages(circus.agent.__path__, 'circus.agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "import circus.common.nix.derivation\n"
        "circus.protocol.schema()")
    assert not imported & SERVER_IMPORTS, imported & SERVER_IMPORTS
    unknown = imported - set(IMPORT_TO_NIXPKGS)
    assert not unknown, f"third-party modules the agent package may lack: {unknown}"
    assert {IMPORT_TO_NIXPKGS[m] for m in imported} == set(outputs["agentDeps"])


def test_worker_package_is_lean(outputs: Any) -> None:
    assert set(outputs["workerDeps"]) == WORKER_DEPS
    assert not WORKER_FORBIDDEN_DEPS & set(outputs["workerDeps"])
    args = outputs["workerArgs"]
    assert args["pname"] == "circus-worker"
    assert args["mainProgram"] == "circus-worker"
    assert args["dontCheckRuntimeDeps"] is True
    assert "! -name circus-worker -delete" in args["postInstall"]
    assert set(args["pythonImportsCheck"]) == {"circus.worker.main", "circus.worker.builder",
                                               "celeryconfig"}
    # it runs Nix and nothing else: no nix-eval-jobs, git or ssh on its PATH
    assert args["makeWrapperArgs"][:3] == ["--suffix", "PATH", ":"]
    assert args["makeWrapperArgs"][3].split(":") == [
        "/nix/store/00000000000000000000000000000000-nix/bin"]


def test_worker_package_covers_what_the_worker_imports(outputs: Any) -> None:
    """Import every module of circus.worker, the Celery worker machinery it starts (thread
    pool, both broker transports) in a fresh interpreter: each third-party module must come
    from the worker package's dependencies, and none is a database or web library."""
    imported = _third_party_imports(
        "import pkgutil, importlib, circus.worker\n"
        "for m in pkgutil.walk_packages(circus.worker.__path__, 'circus.worker.'):\n"
        "    importlib.import_module(m.name)\n"
        "import celeryconfig, celery.apps.worker, celery.concurrency.thread\n"
        "import kombu.transport.redis, kombu.transport.pyamqp, redis\n"
        "from circus.worker.main import RemoteWorkerDaemon")
    assert not imported & WORKER_FORBIDDEN_IMPORTS, imported & WORKER_FORBIDDEN_IMPORTS
    unknown = imported - set(WORKER_IMPORT_TO_NIXPKGS)
    assert not unknown, f"third-party modules the worker package may lack: {unknown}"
    needed = {WORKER_IMPORT_TO_NIXPKGS[m] for m in imported} - {None}
    assert needed == set(outputs["workerDeps"])


def test_nixos_module_of_the_flake_uses_the_flake_package(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    expr = f"""
      let
        f = {FLAKE};
        eval = import {STANDIN}/eval.nix {{ modules = [ f.self.nixosModules.circus
          f.self.nixosModules.circus-agent f.self.nixosModules.circus-worker args ]; }};
        units = eval.config.systemd.services;
      in {{
        server = units.circus-server.serviceConfig.ExecStart;
        agent = units.circus-agent.serviceConfig.ExecStart;
        worker = units.circus-worker.serviceConfig.ExecStart;
        failed = eval.failedAssertions;
      }}
    """
    user = {"services": {
        "circus": {"enable": True, "settings": {"server": {"secret_key_file": str(secret)}}},
        "circus-agent": {"enable": True, "runnerUrl": "tls://ci.example.org:7000",
                         "tokenFile": str(secret)},
        "circus-worker": {"enable": True, "serverUrl": "https://ci.example.org",
                          "tokenFile": str(secret),
                          "brokerUrl": "redis://broker.example.org:6379/0"}}}
    result = nix_eval(expr, tmp_path, user)
    assert result["failed"] == []
    assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-circus-0\.1\.0/bin/circus-server",
                        result["server"])
    assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-circus-agent-0\.1\.0/bin/circus-agent",
                        result["agent"])
    assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-circus-worker-0\.1\.0/bin/circus-worker",
                        result["worker"])
