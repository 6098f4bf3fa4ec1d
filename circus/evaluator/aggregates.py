"""Resolving aggregate jobs' constituents the way Hydra does.

An aggregate (``_hydraAggregate = true``) names its constituents by derivation or
by job name; with ``_hydraGlobConstituents = true`` each name is an fnmatch-style
pattern over the evaluation's job names (``"packages.*"``, ``"*"``), never
matching the aggregate itself. Nothing is dropped silently: a name that matches
no job, a pattern without matches, a constituent that failed to evaluate and a
cycle between aggregates (directly or through a pattern) become errors of the
aggregate, with Hydra's messages ("x: does not exist", "tests.*: constituent glob
pattern had no matches", "Dependency cycle: a <-> b"). The importer records them
on the aggregate build, which fails; the other jobs are unaffected.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from circus.evaluator.jobs import Job


@dataclass
class Resolution:
    """An aggregate's constituents (job names) and what is wrong with them."""

    members: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def resolve(jobs: Set[str], named: Mapping[str, Job],
            errors: Mapping[str, str]) -> dict[str, Resolution]:
    """Resolve every aggregate of ``named`` (by job name) against all jobs and errors.

    ``jobs`` are the names of the evaluation's jobs, ``named`` its aggregates naming
    their constituents, ``errors`` the per-job evaluation errors by name.
    Constituents given as derivations are resolved by the importer.
    """
    names = sorted(jobs | set(errors))
    result: dict[str, Resolution] = {}
    for name in sorted(named):
        job = named[name]
        if not job.named_constituents:
            continue
        resolution = result[name] = Resolution()
        for pattern in job.named_constituents:
            if job.glob_constituents:
                matches = [n for n in names if n != name and fnmatch.fnmatchcase(n, pattern)]
                if not matches:
                    resolution.errors.append(
                        f"{pattern}: constituent glob pattern had no matches")
            else:
                matches = [pattern] if pattern != name else []
            for match in matches:
                if match in jobs:
                    resolution.members.add(match)
                elif match in errors:
                    resolution.errors.append(f"{match}: {errors[match]}")
                else:
                    resolution.errors.append(f"{match}: does not exist")
    for component in _cycles({n: {m for m in r.members if m in result}
                              for n, r in result.items()}):
        message = "Dependency cycle: " + " <-> ".join(sorted(component))
        for name in component:
            result[name].errors.append(message)
    return result


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found
