"""Evaluate flake.nix and deploy/nixos/*.nix with the local Nix, without nixpkgs.

There is no nixpkgs (and no network) on the test machines, so the modules are evaluated
against the STAND-IN lib and pkgs of ``tests/deploy/standin/`` (a miniature of the NixOS
module system: see its lib.nix). What that cannot show is listed in docs/INSTALL.md
("What the tests do not check"); ``nix flake check`` with network does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from circus.common.nix.environment import nix_environ

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin"
CIRCUS_MODULE = REPO_ROOT / "deploy" / "nixos" / "circus.nix"
AGENT_MODULE = REPO_ROOT / "deploy" / "nixos" / "circus-agent.nix"
WORKER_MODULE = REPO_ROOT / "deploy" / "nixos" / "circus-worker.nix"
HARDENING = REPO_ROOT / "deploy" / "nixos" / "hardening.nix"


class NixEvalError(Exception):
    pass


def nix_eval(expr: str, tmp_path: Path, args: dict[str, Any] | None = None) -> Any:
    """``nix-instantiate --eval --strict --json`` of ``expr``.

    ``args`` is written as JSON and bound to ``args`` in the expression (so Python
    values reach Nix without building Nix syntax by hand).
    """
    args_file = tmp_path / f"args-{len(list(tmp_path.glob('args-*.json')))}.json"
    args_file.write_text(json.dumps(args or {}))
    full = f"let args = builtins.fromJSON (builtins.readFile {args_file}); in {expr}"
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", full],
        env=nix_environ([]), capture_output=True, text=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr)
    return json.loads(proc.stdout)


def eval_modules(module: Path, user_config: dict[str, Any], tmp_path: Path,
                 select: str = "") -> Any:
    """The stand-in evaluation of ``module`` plus ``user_config`` (see standin/eval.nix)."""
    expr = (f"(import {STANDIN}/eval.nix {{ modules = [ {module} args ]; }})"
            + (f".{select}" if select else ""))
    return nix_eval(expr, tmp_path, user_config)


def to_toml(data: dict[str, Any]) -> str:
    """TOML for JSON-like ``data``: every top-level key as an inline table (tests only)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return json.dumps(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"not representable in TOML: {v!r}")

    return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in data.items())
