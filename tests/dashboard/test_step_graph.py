"""The step graph of a build (circus/server/stepgraph.py) on PostgreSQL rows: edges
mapped onto the build's own steps, the failure path of the latest attempt, the tree."""

from __future__ import annotations

from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus
from circus.common.models import BuildStep, Step, StepDependency
from circus.server.stepgraph import MAX_TREE_DEPTH, TreeNode, failure, step_graph, tree
from tests.dashboard.conftest import Browser
from tests.dashboard.factories import Rows, fake_store_path


def _edge(db: Session, step: Step, *deps: Step) -> None:
    db.add_all(StepDependency(step_id=step.id, depends_on_id=d.id) for d in deps)
    db.flush()


def test_edges_failure_path_and_tree_of_a_restarted_build(rows: Rows, db: Session) -> None:
    project = rows.project()
    evaluation = rows.evaluation(rows.jobset(project))
    build = rows.build(evaluation, "app", BuildStatus.dependency_failed)
    # an earlier build's step of "lib" (succeeded, reused here) points at that build's
    # own step of "leaf", which this build does not list: mapped by derivation
    other = rows.build(evaluation, "other", BuildStatus.succeeded)
    leaf_drv, lib_drv, tool_drv = (fake_store_path(n, ".drv") for n in ("leaf", "lib", "tool"))
    old_leaf = rows.step(other, drv_path=leaf_drv, toplevel=False,
                         status=BuildStatus.succeeded)
    lib = rows.step(other, drv_path=lib_drv, toplevel=False, status=BuildStatus.succeeded)
    _edge(db, lib, old_leaf)

    # attempt 1 of the build: its own step failed by itself
    first = rows.step(build, status=BuildStatus.failed, log="attempt one failed\n")
    # attempt 2: leaf (rebuilt, fails) <- tool <- app, and app <- lib (reused) <- leaf
    leaf = rows.step(build, drv_path=leaf_drv, toplevel=False, status=BuildStatus.failed,
                     log="compiling\nleaf broke\n", exit_code=2, machine="ssh:b1")
    tool = rows.step(build, drv_path=tool_drv, toplevel=False,
                     status=BuildStatus.dependency_failed, propagated_from=leaf)
    # the reused step of lib is listed for this build too (as the dispatcher links it)
    db.add(BuildStep(build_id=build.id, step_nr=4, step_id=lib.id, drv_path=lib_drv))
    db.flush()
    app = rows.step(build, status=BuildStatus.dependency_failed, propagated_from=leaf,
                    machine=None)
    _edge(db, tool, leaf)
    _edge(db, app, tool, lib)

    graph = step_graph(db, build.id)
    assert graph.depends_on[app.id] == sorted([tool.id, lib.id])
    assert graph.depends_on[tool.id] == [leaf.id]
    # the reused lib's edge to the other build's leaf lands on this build's leaf
    assert graph.depends_on[lib.id] == [leaf.id]
    assert graph.depends_on[first.id] == []
    # roots: the build's own steps, newest attempt first
    assert [s.step_id for s in graph.roots()] == [app.id, first.id]

    found = failure(graph, str(rows.log_dir))
    assert found is not None
    assert [s.step_id for s in found.path] in ([app.id, tool.id, leaf.id],
                                               [app.id, lib.id, leaf.id])
    assert found.failed_step.step_id == leaf.id
    assert found.machine == "ssh:b1"
    assert found.log_tail == "compiling\nleaf broke\n"

    drawn = tree(graph, found.path)
    top = drawn[0]
    assert top.step.step_id == app.id
    assert top.on_failure_path
    # leaf is drawn in full once (under the branch on the failure path), referenced once
    seen = []

    def walk(nodes: list[TreeNode]) -> None:
        for node in nodes:
            seen.append((node.step.step_id, node.repeat))
            walk(node.children)

    walk(drawn)
    assert seen.count((leaf.id, False)) == 1
    assert seen.count((leaf.id, True)) == 1
    assert top.children[0].step.step_id == found.path[1].step_id


def test_a_build_whose_own_step_failed_is_its_own_failure_path(rows: Rows, db: Session
                                                               ) -> None:
    project = rows.project()
    evaluation = rows.evaluation(rows.jobset(project))
    build = rows.build(evaluation, "tests", BuildStatus.failed)
    own = rows.step(build, status=BuildStatus.failed, log="x\n" * 5000, exit_code=1)
    found = failure(step_graph(db, build.id), str(rows.log_dir))
    assert found is not None
    assert [s.step_id for s in found.path] == [own.id]
    assert found.log_truncated
    assert found.log_tail is not None
    assert found.log_tail.startswith("x\n")

    succeeded = rows.build(evaluation, "fine", BuildStatus.succeeded)
    rows.step(succeeded)
    assert failure(step_graph(db, succeeded.id), str(rows.log_dir)) is None


def test_a_deep_chain_is_cut_in_the_drawn_tree(rows: Rows, db: Session,
                                               as_admin: Browser) -> None:
    """The page draws MAX_TREE_DEPTH levels and says where the rest is."""
    project = rows.project()
    evaluation = rows.evaluation(rows.jobset(project))
    build = rows.build(evaluation, "deep", BuildStatus.succeeded)
    chain = [rows.step(build, drv_path=fake_store_path(f"level{i}", ".drv"), toplevel=False)
             for i in range(MAX_TREE_DEPTH + 10)]
    top = rows.step(build)
    for upper, lower in zip([top, *chain], chain, strict=False):
        _edge(db, upper, lower)
    db.commit()

    drawn = tree(step_graph(db, build.id))
    depth, node = 1, drawn[0]
    while node.children:
        depth, node = depth + 1, node.children[0]
    assert depth == MAX_TREE_DEPTH
    assert node.cut

    page = as_admin.get(f"/build/{build.id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count("its dependencies are in the table below") == 1
