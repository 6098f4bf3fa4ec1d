"""A build's steps as a graph: which step waited on which, and the path to a failure.

``build_steps`` lists every step a build waited for; ``step_dependencies`` holds
the edges, recorded once when a step is created. A step reused from an earlier
build (or an earlier attempt) may point at a dependency's *older* step, which
this build does not list: such an edge is mapped, by derivation, onto the
build's own (latest) step of that derivation, so every edge returned joins two
steps of the build.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, StepState
from circus.common.models import BuildStep, Step
from circus.server import logfiles

#: how much of the failed step's log the failure summary carries
FAILURE_LOG_TAIL_BYTES = 4 * 1024
#: levels of the drawn tree; deeper steps are cut (each level costs the template
#: several Python frames, and the steps table lists every step anyway)
MAX_TREE_DEPTH = 40


@dataclass
class StepGraph:
    #: the build's steps in ``step_nr`` order (rows of :func:`build_steps`)
    steps: list[SimpleNamespace]
    #: step id → ids of the build's steps it waited on (sorted)
    depends_on: dict[int, list[int]]

    @property
    def by_id(self) -> dict[int, SimpleNamespace]:
        return {s.step_id: s for s in self.steps}

    def roots(self) -> list[SimpleNamespace]:
        """Steps no other step of the build waited on: the build's own step (one per
        attempt, newest first), then anything left over, such as a dependency whose
        dependent was never recorded."""
        needed = {d for deps in self.depends_on.values() for d in deps}
        free = [s for s in self.steps if s.step_id not in needed]
        return sorted(free, key=lambda s: (not s.is_toplevel, -s.step_nr))

    def top(self) -> SimpleNamespace | None:
        """The build's own step of its latest attempt."""
        own = [s for s in self.steps if s.is_toplevel]
        return max(own, key=lambda s: s.step_nr) if own else None


def build_steps(session: Session, build_id: int) -> list[SimpleNamespace]:
    """Every step a build waited for, in order, with the step's state (one query)."""
    rows = session.execute(
        select(BuildStep, Step).join(Step, Step.id == BuildStep.step_id)
        .where(BuildStep.build_id == build_id).order_by(BuildStep.step_nr))
    return [SimpleNamespace(
        step_id=step.id, build_id=bs.build_id, step_nr=bs.step_nr, drv_path=bs.drv_path,
        is_toplevel=bs.is_toplevel, state=step.state, status=step.status, system=step.system,
        machine=step.machine, exit_code=step.exit_code, error_message=step.error_message,
        propagated_from_step_id=bs.propagated_from_step_id, started_at=step.started_at,
        finished_at=step.finished_at, log_size=step.log_size, log_path=step.log_path,
        # a running step writes its log before log_path records it
        has_log=bool(step.log_path) or step.state is StepState.running,
    ) for bs, step in rows]


def step_graph(session: Session, build_id: int) -> StepGraph:
    """The build's steps and the edges between them (two queries)."""
    steps = build_steps(session, build_id)
    ids = [s.step_id for s in steps]
    latest_of_drv = {s.drv_path: s.step_id for s in steps}  # step_nr order: the last wins
    depends_on: dict[int, set[int]] = {i: set() for i in ids}
    if ids:
        edges = session.execute(text("""
            SELECT e.step_id, e.depends_on_id, d.drv_path
            FROM step_dependencies e JOIN steps d ON d.id = e.depends_on_id
            WHERE e.step_id = ANY(:ids)
        """), {"ids": ids}).all()
        known = set(ids)
        for step_id, dep_id, dep_drv in edges:
            target = dep_id if dep_id in known else latest_of_drv.get(dep_drv)
            if target is not None and target != step_id:
                depends_on[step_id].add(target)
    return StepGraph(steps, {i: sorted(deps) for i, deps in depends_on.items()})


@dataclass
class Failure:
    """Why a build failed: the path from its own step down to the step that failed."""

    #: the build's own step first, the failed step last
    path: list[SimpleNamespace]
    failed_step: SimpleNamespace
    log_tail: str | None
    log_truncated: bool

    @property
    def machine(self) -> str | None:
        machine: str | None = self.failed_step.machine
        return machine


def is_failed(step: SimpleNamespace) -> bool:
    return step.status is not None and step.status is not BuildStatus.succeeded


def _shortest_path(graph: StepGraph, start: int, goal: int) -> list[int] | None:
    came_from: dict[int, int | None] = {start: None}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        if current == goal:
            path: list[int] = []
            node: int | None = current
            while node is not None:
                path.append(node)
                node = came_from[node]
            return path[::-1]
        for dep in graph.depends_on.get(current, []):
            if dep not in came_from:
                came_from[dep] = current
                queue.append(dep)
    return None


def failure(graph: StepGraph, log_dir: str) -> Failure | None:
    """The failure of the build's latest attempt, or None if its own step did not fail.

    A step failed because a dependency failed names that dependency
    (``propagated_from_step_id``, set by the queue runner on every transitive
    dependent); the path to it is the shortest chain of edges.
    """
    top = graph.top()
    if top is None or not is_failed(top):
        return None
    by_id = graph.by_id
    origin = by_id.get(top.propagated_from_step_id or top.step_id, top)
    chain = _shortest_path(graph, top.step_id, origin.step_id)
    # an origin the edges do not reach (a step reused without its edges) still is the cause
    path = [by_id[i] for i in chain] if chain else [top, origin] if origin is not top else [top]
    tail, truncated = None, False
    log = logfiles.step_log(log_dir, origin.log_path, origin.drv_path,
                            origin.step_id)
    if log is not None:
        tail, _, truncated = logfiles.tail_text(log, FAILURE_LOG_TAIL_BYTES)
    return Failure(path, origin, tail, truncated)


@dataclass
class TreeNode:
    """One step in the tree the build page draws; a step reached a second time is a
    reference (``repeat``) to where it was drawn first, without its children; a step
    below ``MAX_TREE_DEPTH`` levels is drawn without them too (``cut``)."""

    step: SimpleNamespace
    repeat: bool = False
    cut: bool = False
    on_failure_path: bool = False
    children: list[TreeNode] = field(default_factory=list)


def tree(graph: StepGraph, failure_path: list[Any] | None = None,
         max_depth: int = MAX_TREE_DEPTH) -> list[TreeNode]:
    """The graph unfolded depth first from its roots, each step drawn in full once."""
    by_id = graph.by_id
    on_path = {s.step_id for s in failure_path or []}
    drawn: set[int] = set()

    def unfold(step_id: int, depth: int) -> TreeNode:
        step = by_id[step_id]
        marked = step_id in on_path
        if step_id in drawn:
            return TreeNode(step, repeat=True, on_failure_path=marked)
        deps = sorted(graph.depends_on.get(step_id, []),
                      key=lambda d: (d not in on_path, by_id[d].step_nr))
        if deps and depth >= max_depth:
            return TreeNode(step, cut=True, on_failure_path=marked)
        drawn.add(step_id)
        return TreeNode(step, on_failure_path=marked,
                        children=[unfold(d, depth + 1) for d in deps])

    return [unfold(root.step_id, 1) for root in graph.roots()]
