"""Public endpoints outside /api/v1: Hydra-style channels and job badges.

``/channel/<name>/…`` serves what ``nix-channel --add`` and Hydra's channel
consumers fetch; ``/job/<project>/<jobset>/<job>/badge|shield|latest`` serves
README badges. They are public (like Hydra's), except for hidden projects: those follow
the one visibility rule (:mod:`circus.auth.visibility`) like every other route, so an
outsider's badge of a hidden job is the badge of a job that does not exist.
"""

from __future__ import annotations

import io
import json
import lzma
import tarfile
import time
from html import escape
from typing import Any

from flask import Blueprint, Response, redirect, request
from flask.typing import ResponseReturnValue
from sqlalchemy import Select, or_, select

from circus.auth.visibility import can_see_project, only_visible
from circus.common.enums import BuildStatus
from circus.common.errors import NotFound
from circus.common.models import Build, Channel, EvaluationBuild, Jobset, Project
from circus.common.models import Evaluation as EvaluationRow
from circus.server.auth import current_actor
from circus.server.context import db_session, settings
from circus.server.security import build_output

blueprint = Blueprint("public", __name__)


def _channel(name: str) -> tuple[Channel, EvaluationRow]:
    session = db_session()
    channel = session.scalar(select(Channel).where(Channel.name == name))
    if channel is None:
        raise NotFound(f"no channel {name}")
    if not can_see_project(session, current_actor(), channel.project_id):
        raise NotFound(f"no channel {name}")
    evaluation = session.get(EvaluationRow, channel.evaluation_id) if channel.evaluation_id \
        else None
    if evaluation is None:
        raise NotFound(f"channel {name} has no evaluation yet")
    return channel, evaluation


def _succeeded_builds(evaluation_id: int) -> list[Build]:
    members = select(EvaluationBuild.build_id).where(
        EvaluationBuild.evaluation_id == evaluation_id)
    return list(db_session().scalars(
        select(Build).where(or_(Build.evaluation_id == evaluation_id, Build.id.in_(members)),
                            Build.status == BuildStatus.succeeded).order_by(Build.job_name)))


def _text(body: str | bytes, mimetype: str = "text/plain") -> Response:
    return Response(body, mimetype=mimetype, headers={"Cache-Control": "no-cache"})


@blueprint.get("/channel/<name:name>/git-revision")
@build_output()
def git_revision(name: str) -> ResponseReturnValue:
    _, evaluation = _channel(name)
    return _text(evaluation.commit_hash or "")


@blueprint.get("/channel/<name:name>/binary-cache-url")
@build_output()
def binary_cache_url(name: str) -> ResponseReturnValue:
    _channel(name)
    config = settings()
    url = config.cache.public_url or (
        (config.server.base_url or request.host_url).rstrip("/") + "/nix-cache")
    return _text(url)


@blueprint.get("/channel/<name:name>/store-paths.xz")
@build_output()
def store_paths(name: str) -> ResponseReturnValue:
    _, evaluation = _channel(name)
    paths = sorted({o.path for b in _succeeded_builds(evaluation.id) for o in b.outputs})
    return _text(lzma.compress(("\n".join(paths) + "\n").encode()), "application/x-xz")


def nix_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def job_path(job_name: str) -> list[str]:
    """A job name's attribute path: the inverse of nix-eval-jobs' ``attr`` (names
    joined with dots, a name holding a dot quoted)."""
    path: list[str] = []
    current: list[str] = []
    quoted = False
    for char in job_name:
        if char == '"':
            quoted = not quoted
        elif char == "." and not quoted:
            path.append("".join(current))
            current = []
        else:
            current.append(char)
    path.append("".join(current))
    return path


def _derivation(build: Build) -> str | None:
    outputs = build.output_map
    if not outputs:
        return None
    main = "out" if "out" in outputs else sorted(outputs)[0]
    attrs = [f"type = {nix_string('derivation')};",
             f"name = {nix_string(build.nix_name or build.job_name)};",
             f"system = {nix_string(build.system)};",
             f"drvPath = {nix_string(build.drv_path)};",
             f"outPath = {nix_string(outputs[main])};",
             f"outputName = {nix_string(main)};",
             "outputs = [ " + " ".join(nix_string(o) for o in sorted(outputs)) + " ];"]
    attrs += [f"{nix_string(o)} = {{ outPath = {nix_string(p)}; }};"
              for o, p in sorted(outputs.items())]
    meta = [f"description = {nix_string(build.meta_description or '')};"]
    install = [o for o in build.outputs_to_install or [] if o in outputs]
    if install:
        # what `nix-env -i` installs (Nix's default without it: outputName only)
        meta.append("outputsToInstall = [ " + " ".join(nix_string(o) for o in install) + " ];")
    attrs.append("meta = { " + " ".join(meta) + " };")
    return "{ " + " ".join(attrs) + " }"


def channel_expression(builds: list[Build]) -> str:
    """A ``default.nix`` whose attributes are the channel's jobs, as store derivations.

    Nested jobs (``packageset.nested``) become nested attribute sets marked with
    ``recurseForDerivations`` (as Hydra writes them), so ``nix-env -qa`` finds them.
    """
    tree: dict[str, Any] = {}
    for build in builds:
        value = _derivation(build)
        if value is None:
            continue
        *parents, leaf = job_path(build.job_name)
        node = tree
        for name in parents:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                break  # a job already sits where this set would go
            node = child
        else:
            node.setdefault(leaf, value)

    def write(node: dict[str, Any], indent: str) -> list[str]:
        lines = []
        for name, value in node.items():
            if isinstance(value, dict):
                lines.append(f"{indent}{nix_string(name)} = {{")
                lines.append(f"{indent}  recurseForDerivations = true;")
                lines += write(value, indent + "  ")
                lines.append(f"{indent}}};")
            else:
                lines.append(f"{indent}{nix_string(name)} = {value};")
        return lines

    header = ["# generated by Circus: the jobs of this channel's evaluation", "{ ... }:", "{"]
    return "\n".join([*header, *write(tree, "  "), "}"]) + "\n"


@blueprint.get("/channel/<name:name>/nixexprs.tar.xz")
@build_output()
def nixexprs(name: str) -> ResponseReturnValue:
    channel, evaluation = _channel(name)
    body = channel_expression(_succeeded_builds(evaluation.id)).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        info = tarfile.TarInfo(f"{channel.name}/default.nix")
        info.size = len(body)
        info.mtime = int(time.time())
        info.mode = 0o444
        tar.addfile(info, io.BytesIO(body))
    return _text(buffer.getvalue(), "application/x-xz")


# ---------------------------------------------------------------------------
# job badges

BADGE = {  # message, colour
    "succeeded": ("passing", "#4c1"),
    "failed": ("failing", "#e05d44"),
    "pending": ("pending", "#dfb317"),
    "unknown": ("unknown", "#9f9f9f"),
}
SHIELD_COLOURS = {"succeeded": "brightgreen", "failed": "red", "pending": "yellow",
                  "unknown": "lightgrey"}


def _job_builds(project: str, jobset: str, job: str) -> Select[Any]:
    """The job's builds, none when its project is hidden from the caller."""
    query: Select[Any] = only_visible(
        select(Build).join(Jobset, Jobset.id == Build.jobset_id)
        .join(Project, Project.id == Jobset.project_id)
        .where(Project.name == project, Jobset.name == jobset, Build.job_name == job),
        Project.id, current_actor())
    return query


def _latest(project: str, jobset: str, job: str, *, succeeded_only: bool = False
            ) -> Build | None:
    session = db_session()
    query = _job_builds(project, jobset, job)
    if succeeded_only:
        query = query.where(Build.status == BuildStatus.succeeded)
    else:
        query = query.where(Build.status.not_in([BuildStatus.pending, BuildStatus.running]))
    found: Build | None = session.scalar(query.order_by(Build.id.desc()).limit(1))
    return found


def _state(project: str, jobset: str, job: str) -> str:
    if "\x00" in project + jobset + job:
        return "unknown"
    build = _latest(project, jobset, job)
    if build is None:
        pending = db_session().scalar(_job_builds(project, jobset, job).limit(1))
        return "pending" if pending is not None else "unknown"
    return "succeeded" if build.status is BuildStatus.succeeded else "failed"


def badge_svg(label: str, message: str, colour: str) -> str:
    # widths approximate Verdana 11px (the shields.io flat style)
    lw, mw = 6 * len(label) + 10, 6 * len(message) + 10
    width = lw + mw
    label, message = escape(label), escape(message)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
            f'aria-label="{label}: {message}"><title>{label}: {message}</title>'
            f'<rect width="{lw}" height="20" fill="#555"/>'
            f'<rect x="{lw}" width="{mw}" height="20" fill="{colour}"/>'
            f'<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" '
            f'font-size="11"><text x="{lw / 2}" y="14">{label}</text>'
            f'<text x="{lw + mw / 2}" y="14">{message}</text></g></svg>')


@blueprint.get("/job/<project>/<jobset>/<path:job>/badge")
def badge(project: str, jobset: str, job: str) -> ResponseReturnValue:
    message, colour = BADGE[_state(project, jobset, job)]
    return Response(badge_svg("build", message, colour), mimetype="image/svg+xml",
                    headers={"Cache-Control": "no-cache, max-age=0"})


@blueprint.get("/job/<project>/<jobset>/<path:job>/shield")
def shield(project: str, jobset: str, job: str) -> ResponseReturnValue:
    """shields.io endpoint badge JSON."""
    state = _state(project, jobset, job)
    body = {"schemaVersion": 1, "label": "build", "message": BADGE[state][0],
            "color": SHIELD_COLOURS[state]}
    return Response(json.dumps(body), mimetype="application/json",
                    headers={"Cache-Control": "no-cache, max-age=0"})


@blueprint.get("/job/<project>/<jobset>/<path:job>/latest")
def latest(project: str, jobset: str, job: str) -> ResponseReturnValue:
    """Redirect to the newest successful build of the job (Hydra's ``/latest``)."""
    if "\x00" in project + jobset + job:
        raise NotFound("no such job")
    build = _latest(project, jobset, job, succeeded_only=True)
    if build is None:
        raise NotFound(f"no successful build of {project}/{jobset}/{job}")
    # a browser (the job page's "latest" link) asks for HTML first: the build page, as
    # Hydra's /latest; scripts (curl's */*, JSON) keep the API's record of the build
    wants_page = request.accept_mimetypes.best_match(
        ["application/json", "text/html"]) == "text/html"
    return redirect(f"/build/{build.id}" if wants_page else f"/api/v1/builds/{build.id}",
                    code=302)

