"""The layering rules that keep the structure (DESIGN §2), checked on the source's AST.

- Only the store seam (``circus.common.nix.store``) runs the Nix commands that
  query the local store.
- The agent reaches no database, web or task-queue code, not even indirectly.
- The remote Celery worker (``circus-worker``) reaches no database or web code: its
  host has no database password, everything goes through the server's API.
- Flask views and Celery tasks import services, not each other.
- The agent gateway depends on the queue runner's step services, never the
  reverse: only the queue runner's entry point (which wires the process
  together) imports the gateway, and the gateway imports neither that entry
  point nor the daemon.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "circus"

#: the command-line words of local store queries (``nix path-info``, ``nix-store --query``…)
STORE_QUERY = re.compile(r"(?<![\w-])(path-info|--requisites|--check-validity|--query)(?![\w-])")
STORE_SEAM = "circus.common.nix.store"
#: modules allowed to spell those words although they are not the seam, and why
STORE_QUERY_ALLOWED = {
    # the commands it builds run on the SSH builder (``remote.run``), asking *its* store
    "circus.queue_runner.ssh.transfer",
}

AGENT = "circus.agent"
AGENT_FORBIDDEN = ("circus.common.models", "circus.common.db", "sqlalchemy", "flask",
                   "celery", "ldap", "psycopg2")

WORKER = "circus.worker"
WORKER_FORBIDDEN = ("circus.common.models", "circus.common.db", "sqlalchemy", "flask",
                    "psycopg2", "ldap", "circus.common.celery")

WEB = "circus.server"

QUEUE_RUNNER = "circus.queue_runner"
GATEWAY = "circus.gateway"
#: the entry point of ``circus-queue-runner``: it hands the gateway to the daemon
QUEUE_RUNNER_ENTRY = "circus.queue_runner.main"
#: what the gateway must not import: the process that runs it
QUEUE_RUNNER_PROCESS = (QUEUE_RUNNER_ENTRY, "circus.queue_runner.daemon")


@dataclass
class Module:
    name: str
    path: Path
    #: every module it imports at run time (not under ``if TYPE_CHECKING:``), by full name
    imports: set[str] = field(default_factory=set)
    #: (line, text) of its string constants that are not docstrings (f-string parts too)
    strings: list[tuple[int, str]] = field(default_factory=list)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstring(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) \
            and node.body and isinstance(node.body[0], ast.Expr) \
            and isinstance(node.body[0].value, ast.Constant):
        return node.body[0].value
    return None


def _read(module: Module, tree: ast.Module, names: set[str]) -> None:
    """Collect imports and strings in one walk, skipping ``if TYPE_CHECKING:`` bodies
    (only type checkers see them)."""
    is_package = module.path.name == "__init__.py"
    docstrings = {id(_docstring(tree))}
    todo: list[ast.AST] = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        docstrings.add(id(_docstring(node)))
        todo += ast.iter_child_nodes(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            module.strings.append((node.lineno, node.value))
        elif isinstance(node, ast.Import):
            module.imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            module.imports.add(base)
            # ``from circus.x import y`` imports the module circus.x.y when there is one
            module.imports.update(f"{base}.{alias.name}" for alias in node.names
                                  if f"{base}.{alias.name}" in names)


@cache
def modules() -> dict[str, Module]:
    paths = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    found = {}
    for name, path in paths.items():
        found[name] = Module(name, path)
        _read(found[name], ast.parse(path.read_text(), str(path)), set(paths))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _reachable(start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not → the circus module that imports it."""
    known = modules()
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        current = todo.pop()
        for imported in sorted(known[current].imports):
            if imported in via:
                continue
            via[imported] = current
            # importing circus.a.b runs circus/__init__ and circus/a/__init__ too
            parents = [".".join(imported.split(".")[:i])
                       for i in range(1, imported.count(".") + 1)]
            todo += [m for m in [*parents, imported] if m in known and m != current]
    return via


def _chain(via: dict[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start and chain[-1] in via:
        chain.append(via[chain[-1]])
    return " -> ".join(reversed(chain))


def test_only_the_store_seam_queries_the_local_store() -> None:
    offenders = []
    for module in modules().values():
        if _within(module.name, STORE_SEAM) or module.name in STORE_QUERY_ALLOWED:
            continue
        for line, value in module.strings:
            match = STORE_QUERY.search(value)
            if match:
                offenders.append(f"{module.name}:{line} spells {match.group(1)!r} "
                                 f"({value[:60]!r})")
    assert not offenders, (
        "only circus.common.nix.store may run nix path-info / nix-store --query / "
        "--check-validity on the local store; use its functions instead:\n"
        + "\n".join(sorted(offenders)))


def test_the_seam_is_where_the_rule_looks() -> None:
    # the rule above must not pass because it looks in the wrong place
    seam = [m for m in modules().values() if _within(m.name, STORE_SEAM)]
    assert any(STORE_QUERY.search(value) for m in seam for _, value in m.strings)
    for allowed in STORE_QUERY_ALLOWED:
        assert any(STORE_QUERY.search(value) for _, value in modules()[allowed].strings)


def test_the_agent_reaches_no_database_web_or_task_code() -> None:
    offenders = []
    for name in sorted(modules()):
        if not _within(name, AGENT):
            continue
        via = _reachable(name)
        offenders += [f"{name} reaches {imported}: {_chain(via, name, imported)}"
                      for imported in sorted(via)
                      if any(_within(imported, bad) for bad in AGENT_FORBIDDEN)]
    assert not offenders, "the agent must not import database/web/task code:\n" + \
        "\n".join(offenders)


def test_the_remote_worker_reaches_no_database_or_web_code() -> None:
    offenders = []
    names = [name for name in sorted(modules()) if _within(name, WORKER)]
    assert names, "no circus.worker modules found: the rule checks nothing"
    for name in names:
        via = _reachable(name)
        offenders += [f"{name} reaches {imported}: {_chain(via, name, imported)}"
                      for imported in sorted(via)
                      if any(_within(imported, bad) for bad in WORKER_FORBIDDEN)]
    assert not offenders, "the remote worker must not import database/web code:\n" + \
        "\n".join(offenders)


def test_views_and_tasks_do_not_import_each_other() -> None:
    known = modules()
    tasks = {name for name, m in known.items() if m.path.name == "tasks.py"}
    offenders = []
    for name, module in known.items():
        if _within(name, WEB):
            offenders += [f"web module {name} imports task module {imported}"
                          for imported in sorted(module.imports) if imported in tasks]
        if name in tasks:
            offenders += [f"task module {name} imports web module {imported}"
                          for imported in sorted(module.imports) if _within(imported, WEB)]
    assert tasks, "no Celery task modules found: the rule checks nothing"
    assert not offenders, "views and tasks import services, not each other:\n" + \
        "\n".join(offenders)


def test_the_gateway_uses_the_queue_runner_not_the_reverse() -> None:
    offenders = []
    for name in sorted(modules()):
        if _within(name, QUEUE_RUNNER) and name != QUEUE_RUNNER_ENTRY:
            via = _reachable(name)
            offenders += [f"{name} reaches {imported}: {_chain(via, name, imported)}"
                          for imported in sorted(via) if _within(imported, GATEWAY)]
        if _within(name, GATEWAY):
            via = _reachable(name)
            offenders += [f"{name} reaches {imported}: {_chain(via, name, imported)}"
                          for imported in sorted(via)
                          if any(_within(imported, bad) for bad in QUEUE_RUNNER_PROCESS)]
    # the rule must not pass because the packages stopped meeting at all
    assert any(_within(imported, QUEUE_RUNNER) for name, module in modules().items()
               if _within(name, GATEWAY) for imported in module.imports)
    assert not offenders, (
        "the gateway is a consumer of the queue runner's step services: no queue-runner "
        f"module but {QUEUE_RUNNER_ENTRY} may import it, and it must not import the "
        "queue runner's process (an import cycle):\n" + "\n".join(offenders))
