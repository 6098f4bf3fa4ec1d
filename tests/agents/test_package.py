"""The agent installs alone: its wheel holds only what it imports, and no server library."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SERVER_LIBRARIES = {"flask", "sqlalchemy", "psycopg2", "psycopg2-binary", "celery", "kombu",
                    "alembic", "python-ldap", "fabric", "boto3", "gunicorn", "redis"}
#: import name -> distribution the agent's wheel requires
THIRD_PARTY = {"capnp": "pycapnp", "pydantic": "pydantic", "pydantic_core": "pydantic",
               "cryptography": "cryptography",
               "zstandard": "zstandard", "joserfc": "joserfc", "requests": "requests"}


def backend() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_backend",
                                                  REPO / "agent" / "agent_backend.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_packs_the_agents_imports_and_nothing_of_the_server() -> None:
    modules = backend().closure()
    assert {"circus.agent.main", "circus.agent.daemon", "circus.protocol"} <= set(modules)
    server = sorted(m for m in modules if not m.startswith(
        ("circus.agent", "circus.common.nix", "circus.protocol"))
        and m not in ("circus", "circus.common", "circus.common.configbase",
                      # tracing: the agent logs like the daemons (standard library only)
                      "circus.common.logging", "circus.common.logcontext",
                      # build statuses the failure classifier names (standard library only)
                      "circus.common.enums"))
    assert server == []
    third_party = set()
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            third_party.update(n.split(".")[0] for n in names)
    third_party -= set(sys.stdlib_module_names) | {"circus", "__future__"}
    assert third_party <= set(THIRD_PARTY), third_party - set(THIRD_PARTY)
    required = {r.split(">")[0].split("=")[0] for r in backend().REQUIRES}
    assert required == {THIRD_PARTY[name] for name in third_party}


def test_one_pip_command_installs_a_working_agent_without_server_libraries(
        tmp_path: Path) -> None:
    venv = tmp_path / "agent-host"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         "-c", str(REPO / "requirements" / "constraints.txt"), str(REPO / "agent")],
        capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    helped = subprocess.run([str(venv / "bin" / "circus-agent"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--config" in helped.stdout
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json",
                             "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "circus-agent" in names
    assert not names & SERVER_LIBRARIES, names & SERVER_LIBRARIES
