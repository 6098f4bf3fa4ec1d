"""A PEP 517 build backend for the ``circus-agent`` wheel: the agent alone.

An agent host runs one daemon that talks Cap'n Proto to the gateway and calls
Nix; it must not need the server's libraries (database drivers, LDAP, Celery,
Flask). The wheel holds exactly the modules ``circus.agent.main`` imports
(found by reading their ``import`` statements, so a new import is packed
without editing a list), the Cap'n Proto schema, and the agent's own
requirements. Install on an agent host with::

    pip install -c requirements/constraints.txt ./agent
"""

from __future__ import annotations

import ast
import base64
import csv
import hashlib
import io
import re
import zipfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
NAME = "circus_agent"
ENTRY = "circus.agent.main"
#: what the agent's modules import from outside the standard library
REQUIRES = ("pycapnp>=2.0", "pydantic>=2.6", "zstandard>=0.22")
DATA = ("circus/protocol/*.capnp", "circus/py.typed")


def version() -> str:
    found = re.search(r"^version\s*=\s*(\S+)", (SOURCE / "setup.cfg").read_text(), re.M)
    assert found, "setup.cfg has no version"
    return found.group(1)


def module_file(module: str) -> Path | None:
    base = SOURCE.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """The ``circus`` modules a file imports (at any depth of the file)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            # ``from package import module``
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "circus" and module_file(m) is not None}


def closure(entry: str = ENTRY) -> dict[str, Path]:
    """Every ``circus`` module ``entry`` needs, with its parent packages."""
    files: dict[str, Path] = {}
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in files:
            continue
        path = module_file(module)
        if path is None:
            continue
        files[module] = path
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(path, module))
    return files


def packed_files() -> list[Path]:
    files = set(closure().values())
    for pattern in DATA:
        files.update(SOURCE.glob(pattern))
    return sorted(files)


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def _metadata() -> str:
    lines = ["Metadata-Version: 2.1", "Name: circus-agent", f"Version: {version()}",
             "Summary: Circus build agent (connects to a Circus gateway, builds with Nix)",
             "License: MIT", "Requires-Python: >=3.11"]
    lines += [f"Requires-Dist: {requirement}" for requirement in REQUIRES]
    return "\n".join(lines) + "\n"


def build_wheel(wheel_directory: str, config_settings: object = None,
                metadata_directory: str | None = None) -> str:
    wheel_name = f"{NAME}-{version()}-py3-none-any.whl"
    dist_info = f"{NAME}-{version()}.dist-info"
    record: list[list[str]] = []
    with zipfile.ZipFile(Path(wheel_directory) / wheel_name, "w",
                         zipfile.ZIP_DEFLATED) as wheel:
        def add(name: str, data: bytes) -> None:
            wheel.writestr(name, data)
            record.append(_record_line(name, data))

        for path in packed_files():
            add(path.relative_to(SOURCE).as_posix(), path.read_bytes())
        add(f"{dist_info}/METADATA", _metadata().encode())
        add(f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: circus agent_backend\n"
                                  b"Root-Is-Purelib: true\nTag: py3-none-any\n")
        add(f"{dist_info}/entry_points.txt",
            f"[console_scripts]\ncircus-agent = {ENTRY}:main\n".encode())
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([*record, [f"{dist_info}/RECORD", "", ""]])
        wheel.writestr(f"{dist_info}/RECORD", out.getvalue())
    return wheel_name


def get_requires_for_build_wheel(config_settings: object = None) -> list[str]:
    return []


def build_sdist(sdist_directory: str, config_settings: object = None) -> str:
    raise NotImplementedError("the agent is distributed as a wheel built from the repository")
