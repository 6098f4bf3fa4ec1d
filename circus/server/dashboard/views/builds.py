"""A build: status, timings, steps, outputs, products, metrics, its log (live), actions."""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Response, flash, redirect, render_template, request, send_file, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from circus.auth.permissions import allowed_actions
from circus.auth.visibility import can_see_project
from circus.common.enums import BuildStatus, StepState
from circus.common.errors import Conflict, NotFound
from circus.common.models import Build, BuildOutput, BuildProduct, Step
from circus.server import logfiles, streams
from circus.server.actions import BuildAction, act_on_build
from circus.server.api.buildfiles import product_file
from circus.server.auth import current_actor
from circus.server.context import db_session, server_context, settings
from circus.server.dashboard import queries
from circus.server.dashboard.access import page
from circus.server.dashboard.blueprint import blueprint
from circus.server.security import build_output, client_address
from circus.server.stepgraph import failure, is_failed, step_graph, tree
from circus.server.usercontent import product_link

#: how much of a log the build page shows (the whole log is one click away)
LOG_TAIL_BYTES = 64 * 1024
B = "/build/<id:build_id>"


def _build_page(build_id: int) -> queries.BuildPage:
    session = db_session()
    found = queries.build_page(session, build_id)
    if found is None or not can_see_project(session, current_actor(), found.project.id):
        raise NotFound(f"no build with id {build_id}")
    return found


def _initial_log_step(steps: list[Any], asked: int | None) -> Any:
    """Which step's log the page opens with: the one asked for; else the step being built
    now; else the build's own step (its latest attempt) if it wrote a log; else the
    dependency that failed."""
    if asked is not None:
        for step in steps:
            if step.step_id == asked:
                return step
        raise NotFound(f"the build has no step {asked}")
    running = [s for s in steps if s.state is StepState.running]
    if running:
        return max(running, key=lambda s: (s.is_toplevel, s.step_nr))
    own = [s for s in steps if s.is_toplevel and s.has_log]
    if own:
        return own[-1]
    failed = [s for s in steps if is_failed(s) and s.has_log]
    return failed[-1] if failed else None


def _int_arg(name: str) -> int | None:
    raw = request.args.get(name, "")
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


@blueprint.get(B)
@page("build")
def build(build_id: int) -> ResponseReturnValue:
    session = db_session()
    found = _build_page(build_id)
    row = found.build
    graph = step_graph(session, build_id)
    steps = graph.steps
    failed = failure(graph, settings().logs.log_dir)
    by_id = {s.step_id: s for s in steps}
    # "which dependency failed": steps that failed because another step failed point at it
    causes: dict[int, Any] = dict(by_id)
    causes.update(queries.steps_by_id(session, {
        s.propagated_from_step_id for s in steps if s.propagated_from_step_id} - set(by_id)))
    log_step = _initial_log_step(steps, _int_arg("step"))
    log_text, log_offset, log_truncated = "", 0, False
    if log_step is not None:
        path = logfiles.step_log(settings().logs.log_dir,
                                 session.scalar(select(Step.log_path).where(
                                     Step.id == log_step.step_id)),
                                 log_step.drv_path, log_step.step_id)
        if path is not None:
            log_text, log_offset, log_truncated = logfiles.tail_text(path, LOG_TAIL_BYTES)
    can = allowed_actions(session, current_actor(), row.project_id)
    return render_template(
        "build.html", build=row, evaluation=found.evaluation, jobset=found.jobset,
        project=found.project, steps=steps, causes=causes,
        step_tree=tree(graph, failed.path if failed else None), failure=failed,
        failed_steps=[s for s in steps if is_failed(s) and not s.propagated_from_step_id],
        log_step=log_step, log_text=log_text, log_offset=log_offset,
        log_truncated=log_truncated, live=not row.status.is_finished,
        # the build records its machine when it finishes; meanwhile its step knows
        machine=row.machine or next((s.machine for s in reversed(steps)
                                     if s.is_toplevel and s.machine), None),
        products=queries.products(session, build_id), metrics=queries.metrics(session, build_id),
        constituents=(queries.related_builds(session, build_id, "constituents")
                      if row.is_aggregate else []),
        dependencies=queries.related_builds(session, build_id, "dependencies"),
        dependents=queries.related_builds(session, build_id, "dependents"),
        actions=_available_actions(row, can))


def _available_actions(build: Build, can: frozenset[Any]) -> list[BuildAction]:
    from circus.server.actions import BUILD_PERMISSIONS

    possible = []
    if not build.status.is_finished:
        possible.append(BuildAction.cancel)
    if build.status is BuildStatus.pending:
        possible.append(BuildAction.bump)
    if build.status.is_finished:
        possible.append(BuildAction.restart)
    possible.append(BuildAction.unkeep if build.keep else BuildAction.keep)
    return [a for a in possible if BUILD_PERMISSIONS[a] in can]


ACTION_DONE = {
    BuildAction.cancel: "Build {id} cancelled.",
    BuildAction.restart: "Build {id} restarted.",
    BuildAction.bump: "Build {id} moved to the front of the queue.",
    BuildAction.keep: "Build {id} will be kept.",
    BuildAction.unkeep: "Build {id} is no longer kept.",
}


@blueprint.post(B + "/<any(cancel,restart,bump,keep,unkeep):action>")
@page("build")
def build_action(build_id: int, action: str) -> ResponseReturnValue:
    session = db_session()
    _build_page(build_id)
    chosen = BuildAction(action)
    try:
        act_on_build(session, current_actor(), build_id, chosen)
        session.commit()
    except Conflict as exc:
        session.rollback()
        flash(exc.message, "error")
    else:
        flash(ACTION_DONE[chosen].format(id=build_id), "ok")
    return redirect(url_for("dashboard.build", build_id=build_id))


# ---------------------------------------------------------------------------
# logs


def _step_of(build_id: int, step_id: int | None) -> Step:
    step = queries.log_step(db_session(), build_id, step_id)
    if step is None:
        raise NotFound(f"build {build_id} has no such step" if step_id is not None
                       else f"build {build_id} has no log yet")
    return step


@blueprint.get(B + "/log")
@page("build")
@build_output()
def log(build_id: int) -> ResponseReturnValue:
    """The whole log of the build's own step (or of ``?step=``), as plain text."""
    _build_page(build_id)
    step = _step_of(build_id, _int_arg("step"))
    path = logfiles.step_log(settings().logs.log_dir, step.log_path, step.drv_path, step.id)
    if path is None:
        raise NotFound(f"no log file for build {build_id}")
    return Response(logfiles.read_chunks(path), mimetype="text/plain",
                    headers={"Cache-Control": "no-store"})


def _resume_point() -> tuple[int | None, int]:
    """(step, byte offset) to continue from: the browser's ``Last-Event-ID`` after a
    dropped connection, else ``?step=&offset=`` from the page."""
    last = request.headers.get("Last-Event-ID", "")
    step_raw, _, offset_raw = last.partition(":")
    if step_raw.isdigit() and offset_raw.isdigit() and len(last) < 40:
        return int(step_raw), int(offset_raw)
    return _int_arg("step"), _int_arg("offset") or 0


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@blueprint.get(B + "/log/stream")
@page("build")
@build_output()
def log_stream(build_id: int) -> ResponseReturnValue:
    """Server-sent events for the build page's live log.

    Follows the asked step, or the step the build is running now. Each batch of
    lines carries ``id: <step>:<offset>`` so a reconnecting browser resumes where
    it stopped. ``end`` says the step finished (and whether the build did);
    ``idle`` says nothing runs yet — the browser retries after ``retry`` ms.
    """
    session = db_session()
    found = _build_page(build_id)
    step_id, offset = _resume_point()
    step: Step | None
    if step_id is not None:
        step = _step_of(build_id, step_id)
    else:
        step = queries.log_step(session, build_id)
        if step is not None and step.state is not StepState.running:
            step = None
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if step is None:
        finished = found.build.status.is_finished
        body = (_event("end", {"build_finished": True, "build": found.build.status.name})
                if finished else "retry: 2000\n" + _event("idle", {"build": "waiting"}))
        return Response(body, mimetype="text/event-stream", headers=headers)
    followed = step.id
    timeout = float(settings().server.request_timeout) * 60
    # release the request's connection: the stream may last as long as the build
    session.close()
    # the generator outlives the request context: hand it what it needs
    tail = LogTail(server_context().session_factory, settings().logs.log_dir, build_id,
                   followed)
    return streams.capped(client_address(), lambda: Response(
        tail.events(offset, timeout), mimetype="text/event-stream", headers=headers))


@dataclass
class LogTail:
    """Follows one step's log for one build page, each poll in a short-lived session."""

    factory: sessionmaker[Session]
    log_dir: str
    build_id: int
    step_id: int

    def locate(self) -> tuple[Path | None, bool]:
        with self.factory() as session:
            row = session.execute(select(Step.log_path, Step.drv_path, Step.state).where(
                Step.id == self.step_id)).first()
        if row is None:
            return None, True
        log_path, drv_path, state = row
        return (logfiles.step_log(self.log_dir, log_path, drv_path, self.step_id),
                state is StepState.done)

    def events(self, offset: int, timeout: float) -> Iterator[str]:
        step_id = self.step_id
        yield "retry: 2000\n" + _event("step", {"step": step_id, "offset": offset})
        pending = b""
        position = offset
        for chunk in logfiles.follow(self.locate, timeout=timeout, start=offset):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if not lines:
                yield ": keep-alive\n\n"
                continue
            position += sum(len(line) + 1 for line in lines)
            yield f"id: {step_id}:{position}\n" + "".join(
                f"data: {line.decode(errors='replace').rstrip(chr(13))}\n" for line in lines) + "\n"
        if pending:
            position += len(pending)
            yield f"id: {step_id}:{position}\ndata: {pending.decode(errors='replace')}\n\n"
        with self.factory() as session:
            step_status = session.scalar(select(Step.status).where(Step.id == step_id))
            build_status = session.scalar(select(Build.status).where(Build.id == self.build_id))
        yield _event("end", {
            "step": step_status.name if step_status is not None else None,
            "build": build_status.name if build_status is not None else None,
            "build_finished": build_status is None or build_status.is_finished})


# ---------------------------------------------------------------------------
# products


@blueprint.get(B + "/download/<id:product_id>")
@blueprint.get(B + "/download/<id:product_id>/<path:sub>")
@page("build")
@build_output()
def download(build_id: int, product_id: int, sub: str | None = None) -> ResponseReturnValue:
    session = db_session()
    _build_page(build_id)
    product = session.get(BuildProduct, product_id)
    if product is None or product.build_id != build_id:
        raise NotFound(f"build {build_id} has no product {product_id}")
    outputs = list(session.scalars(select(BuildOutput.path).where(
        BuildOutput.build_id == build_id)))
    path = product_file(product, outputs, sub)
    if settings().server.products_origin:
        # viewed from an origin without our session (see circus.server.usercontent)
        return redirect(product_link(build_id, product_id, sub), code=302)
    mimetype = (product.content_type if not product.is_directory else None) or \
        mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # an HTML manual may be viewed here, in a sandbox (see build_output)
    return send_file(path, mimetype=mimetype, download_name=path.name, conditional=True)
