"""flake.nix: its `outputs` called with stand-in inputs (tests/deploy/standin/flake.nix).

Nothing is built: buildPythonApplication of the stand-in keeps its arguments, so the
tests check which nixpkgs Python packages each package asks for against setup.cfg and
against what circus.agent really imports.
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
        agentArgs = {{
          inherit (o.packages.x86_64-linux.circus-agent.standInArgs)
            pname dontCheckRuntimeDeps postInstall pythonImportsCheck;
          mainProgram = o.packages.x86_64-linux.circus-agent.standInArgs.meta.mainProgram;
        }};
        circusArgs = {{
          inherit (o.packages.x86_64-linux.circus.standInArgs) pname version dontCheckRuntimeDeps;
        }};
        circusPath = o.packages.x86_64-linux.circus.outPath;
        agentPath = o.packages.x86_64-linux.circus-agent.outPath;
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
        assert set(outputs["packages"][system]) == {"circus", "circus-agent", "default"}
        assert set(outputs["devShells"][system]) == {"default"}
        assert set(outputs["checks"][system]) == {"circus", "circus-agent", "modules"}
        assert {"default", "circus-server", "circus-agent"} <= set(outputs["apps"][system])
    assert set(outputs["nixosModules"]) == {"circus", "circus-agent", "default"}


def test_apps_run_the_packages(outputs: Any) -> None:
    programs = outputs["programs"]
    assert programs["circus-server"] == f"{outputs['circusPath']}/bin/circus-server"
    assert programs["default"] == f"{outputs['circusPath']}/bin/circus"
    assert programs["circus-agent"] == f"{outputs['agentPath']}/bin/circus-agent"
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
    assert outputs["circusArgs"] == {"pname": "circus", "version": "0.1.0",
                                     "dontCheckRuntimeDeps": False}
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


def test_agent_package_covers_what_the_agent_imports(outputs: Any) -> None:
    """Import every module of circus.agent (and what it loads lazily) in a fresh
    interpreter: each third-party module must come from the agent package's dependencies."""
    code = ("import sys, pkgutil, importlib, circus.agent, circus.protocol\n"
            "for m in pkgutil.walk_packages(circus.agent.__path__, 'circus.agent.'):\n"
            "    importlib.import_module(m.name)\n"
            "import circus.common.nix.derivation\n"
            "circus.protocol.schema()\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules}\n"
            "                      - set(sys.stdlib_module_names))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    imported = {m for m in proc.stdout.split()
                if m not in {"circus", "__main__", "cython_runtime", "_distutils_hack"}
                and not m.startswith(("_cython_", "_sysconfigdata_", "__editable__"))}
    assert not imported & SERVER_IMPORTS, imported & SERVER_IMPORTS
    unknown = imported - set(IMPORT_TO_NIXPKGS)
    assert not unknown, f"third-party modules the agent package may lack: {unknown}"
    assert {IMPORT_TO_NIXPKGS[m] for m in imported} == set(outputs["agentDeps"])


def test_nixos_module_of_the_flake_uses_the_flake_package(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    expr = f"""
      let
        f = {FLAKE};
        eval = import {STANDIN}/eval.nix {{ modules = [ f.self.nixosModules.circus
          f.self.nixosModules.circus-agent args ]; }};
        units = eval.config.systemd.services;
      in {{
        server = units.circus-server.serviceConfig.ExecStart;
        agent = units.circus-agent.serviceConfig.ExecStart;
        failed = eval.failedAssertions;
      }}
    """
    user = {"services": {
        "circus": {"enable": True, "settings": {"server": {"secret_key_file": str(secret)}}},
        "circus-agent": {"enable": True, "runnerUrl": "tls://ci.example.org:7000",
                         "tokenFile": str(secret)}}}
    result = nix_eval(expr, tmp_path, user)
    assert result["failed"] == []
    assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-circus-0\.1\.0/bin/circus-server",
                        result["server"])
    assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-circus-agent-0\.1\.0/bin/circus-agent",
                        result["agent"])
