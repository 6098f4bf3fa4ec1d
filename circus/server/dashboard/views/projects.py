"""Projects, a project, a jobset (evaluations and the job matrix), a job, channels."""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from circus.auth.permissions import Action, allowed_actions
from circus.auth.visibility import only_visible, require_visible
from circus.common.enums import InputType, JobsetState, MemberRole, TriggerMode
from circus.common.errors import CircusError, NotFound
from circus.common.models import Build, Evaluation, Jobset, JobsetInput, Project
from circus.projects import service
from circus.server import actions
from circus.server.api.queries import loaded_build_counts
from circus.server.auth import current_actor
from circus.server.context import db_session, settings
from circus.server.dashboard import queries
from circus.server.dashboard.access import page
from circus.server.dashboard.blueprint import blueprint
from circus.server.dashboard.forms import Form, query_text
from circus.server.dashboard.pagination import page_number, paginate

MATRIX_EVALUATIONS = 10
MATRIX_JOBS = 50


def _project(ref: str) -> Project:
    """The project, a 404 when it is hidden from the viewer (as in the API)."""
    session = db_session()
    project = service.get_project(session, ref)
    require_visible(session, current_actor(), project.id, f"project {ref}")
    return project


# ---------------------------------------------------------------------------
# projects


PROJECT_FIELDS = ("name", "description", "repository_url")


@blueprint.get("/projects")
@page("projects")
def projects() -> ResponseReturnValue:
    return _projects_page(Form())


def _projects_page(form: Form) -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    query = only_visible(select(Project), Project.id, actor).order_by(Project.name)
    listed = paginate(session, query, 50)
    return render_template(
        "projects.html", projects=listed,
        overview=queries.project_overview(session, [p.id for p in listed.items]),
        can_create=Action.project_create in allowed_actions(session, actor),
        form=form), form.status


@blueprint.post("/projects")
@page("projects")
def create_project() -> ResponseReturnValue:
    form = Form.posted(*PROJECT_FIELDS)
    form.require("name")
    name = form.get("name")
    if form.run(lambda session: service.create_project(
            session, current_actor(), name=name, description=form.get("description"),
            repository_url=form.get("repository_url"),
            allowed_schemes=settings().server.allowed_url_schemes,
            allowed_paths=settings().evaluator.allowed_path_inputs)):
        flash(f"Project {name} created.", "ok")
        return redirect(url_for("dashboard.project", project=name))
    return _projects_page(form)


@blueprint.get("/project/<name:project>")
@page("project")
def project(project: str) -> ResponseReturnValue:
    return _project_page(_project(project), Form())


PROJECT_SETTINGS = ("description", "repository_url", "enabled", "hidden", "cache_enabled")


def _project_settings(row: Project) -> Form:
    return Form({"description": row.description or "", "repository_url":
                 row.repository_url or "", **{name: _flag(getattr(row, name))
                                              for name in ("enabled", "hidden",
                                                           "cache_enabled")}})


def _flag(value: bool) -> str:
    return "true" if value else "false"


@blueprint.post("/project/<name:project>/settings")
@page("project")
def update_project(project: str) -> ResponseReturnValue:
    row = _project(project)
    form = Form.posted(*PROJECT_SETTINGS)
    flags = {name: form.get(name) == "true" for name in ("enabled", "hidden", "cache_enabled")
             if form.get(name) in ("true", "false")}
    if form.run(lambda session: service.update_project(session, current_actor(), row, {
            "description": form.get("description"),
            "repository_url": form.get("repository_url"), **flags},
            allowed_schemes=settings().server.allowed_url_schemes,
            allowed_paths=settings().evaluator.allowed_path_inputs)):
        flash(f"Project {row.name} saved.", "ok")
        return redirect(url_for("dashboard.project", project=row.name))
    return _project_page(_project(project), Form(), settings_form=form)


@blueprint.post("/project/<name:project>/members")
@page("project")
def set_member(project: str) -> ResponseReturnValue:
    row = _project(project)
    form = Form.posted("username", "role")
    form.require("username")
    if form.get("role") not in MemberRole.__members__:
        form.add("role", "unknown role")
    if form.ok:
        session = db_session()
        try:
            service.set_member(session, current_actor(), row, username=form.get("username"),
                               role=MemberRole[form.get("role")])
            session.commit()
        except NotFound:
            session.rollback()
            form.add("username", "no such user")
        except CircusError as exc:
            session.rollback()
            form.fail(exc)
        else:
            flash(f"{form.get('username')} is now a {form.get('role')} of {row.name}.", "ok")
            return redirect(url_for("dashboard.project", project=row.name))
    return _project_page(_project(project), Form(), member_form=form)


@blueprint.post("/project/<name:project>/members/<id:user_id>/delete")
@page("project")
def remove_member(project: str, user_id: int) -> ResponseReturnValue:
    row = _project(project)
    session = db_session()
    service.remove_member(session, current_actor(), row, user_id)
    session.commit()
    flash("Member removed.", "ok")
    return redirect(url_for("dashboard.project", project=row.name))


def _project_page(row: Project, form: Form, settings_form: Form | None = None,
                  member_form: Form | None = None) -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    jobsets = list(session.scalars(select(Jobset).where(Jobset.project_id == row.id)
                                   .order_by(Jobset.name)))
    if not actor.is_admin:
        jobsets = [j for j in jobsets if not j.hidden]
    latest = queries.latest_evaluations(session, [j.id for j in jobsets])
    counts = loaded_build_counts(session, latest.values())
    summary = {jobset_id: queries.ListedEvaluation(e, row.name, "", counts.get(e.id, {}))
               for jobset_id, e in latest.items()}
    recent = queries.listed(session.execute(
        queries.build_list(Build.project_id == row.id).order_by(Build.id.desc()).limit(10)))
    owner = row.owner
    return render_template(
        "project.html", project=row, jobsets=jobsets, latest=summary, owner=owner,
        channels=queries.channel_list(session, project_id=row.id),
        members=queries.members(session, row.id), recent=recent,
        can=allowed_actions(session, actor, row.id), form=form,
        settings_form=settings_form or _project_settings(row),
        member_form=member_form or Form({"role": MemberRole.member.name}),
        states=list(JobsetState), trigger_modes=list(TriggerMode)), \
        max(f.status for f in (form, settings_form, member_form) if f is not None)


JOBSET_FIELDS = ("name", "description", "nix_expression", "branch", "flake_mode", "state",
                 "trigger_mode", "check_interval", "scheduling_shares", "keep_nr",
                 "check_reproducibility")


def _jobset_values(form: Form) -> dict[str, Any]:
    """The jobset settings of a create or settings form (errors go into ``form``)."""
    numbers = {name: form.integer(name, minimum=1 if name == "scheduling_shares" else 0)
               for name in ("check_interval", "scheduling_shares", "keep_nr")}
    state, mode = form.get("state") or "enabled", form.get("trigger_mode") or "source_change"
    if state not in JobsetState.__members__:
        form.add("state", "unknown state")
    if mode not in TriggerMode.__members__:
        form.add("trigger_mode", "unknown trigger mode")
    if not form.ok:
        return {}
    return {"description": form.get("description"),
            "nix_expression": form.get("nix_expression") or "hydraJobs",
            "branch": form.get("branch") or None,
            "flake_mode": form.get("flake_mode") != "false",
            "state": JobsetState(state), "trigger_mode": TriggerMode(mode),
            "check_reproducibility": form.get("check_reproducibility") == "true",
            **{k: v for k, v in numbers.items() if v is not None}}


@blueprint.post("/project/<name:project>/jobsets")
@page("project")
def create_jobset(project: str) -> ResponseReturnValue:
    row = _project(project)
    form = Form.posted(*JOBSET_FIELDS)
    form.require("name")
    values = _jobset_values(form)
    name = form.get("name")
    if form.run(lambda session: service.create_jobset(session, current_actor(), row,
                                                      name=name, **values)):
        flash(f"Jobset {name} created.", "ok")
        return redirect(url_for("dashboard.jobset", project=row.name, jobset=name))
    return _project_page(_project(project), form)


# ---------------------------------------------------------------------------
# jobsets


def _jobset(project: str, jobset: str) -> tuple[Project, Jobset]:
    row = _project(project)
    found = service.get_jobset(db_session(), row, jobset)
    if found.hidden and not current_actor().is_admin:
        raise NotFound(f"no jobset {jobset} in project {row.name}")
    return row, found


@blueprint.get("/jobset/<name:project>/<name:jobset>")
@page("jobset")
def jobset(project: str, jobset: str) -> ResponseReturnValue:
    project_row, row = _jobset(project, jobset)
    return _jobset_page(project_row, row, _jobset_settings(row))


def _jobset_settings(row: Jobset) -> Form:
    return Form({"description": row.description or "", "nix_expression": row.nix_expression,
                 "branch": row.branch or "", "flake_mode": _flag(row.flake_mode),
                 "state": row.state.name, "trigger_mode": row.trigger_mode.name,
                 "check_interval": str(row.check_interval),
                 "scheduling_shares": str(row.scheduling_shares), "keep_nr": str(row.keep_nr),
                 "check_reproducibility": _flag(row.check_reproducibility)})


@blueprint.post("/jobset/<name:project>/<name:jobset>/settings")
@page("jobset")
def update_jobset(project: str, jobset: str) -> ResponseReturnValue:
    project_row, row = _jobset(project, jobset)
    form = Form.posted(*JOBSET_FIELDS[1:])
    values = _jobset_values(form)
    if form.run(lambda session: service.update_jobset(session, current_actor(), row, values)):
        flash(f"Jobset {row.name} saved.", "ok")
        return redirect(url_for("dashboard.jobset", project=project_row.name,
                                jobset=row.name))
    return _jobset_page(*_jobset(project, jobset), form)


INPUT_FIELDS = ("name", "input_type", "value")


@blueprint.post("/jobset/<name:project>/<name:jobset>/inputs")
@page("jobset")
def add_input(project: str, jobset: str) -> ResponseReturnValue:
    project_row, row = _jobset(project, jobset)
    form = Form.posted(*INPUT_FIELDS)
    form.require("name")
    kind = form.get("input_type")
    if kind not in InputType.__members__:
        form.add("input_type", "unknown input type")
    if form.run(lambda session: service.add_input(
            session, current_actor(), row, name=form.get("name"), input_type=InputType[kind],
            value=form.get("value"), allowed_paths=settings().evaluator.allowed_path_inputs)):
        flash(f"Input {form.get('name')} added.", "ok")
        return redirect(url_for("dashboard.jobset", project=project_row.name,
                                jobset=row.name))
    project_row, row = _jobset(project, jobset)
    return _jobset_page(project_row, row, _jobset_settings(row), input_form=form)


@blueprint.post("/jobset/<name:project>/<name:jobset>/inputs/<name:input_name>/delete")
@page("jobset")
def delete_input(project: str, jobset: str, input_name: str) -> ResponseReturnValue:
    project_row, row = _jobset(project, jobset)
    session = db_session()
    service.delete_input(session, current_actor(), row, input_name)
    session.commit()
    flash(f"Input {input_name} removed.", "ok")
    return redirect(url_for("dashboard.jobset", project=project_row.name, jobset=row.name))


def _jobset_page(project_row: Project, row: Jobset, settings_form: Form,
                 input_form: Form | None = None) -> ResponseReturnValue:
    session = db_session()
    evaluations = paginate(session, queries.evaluation_list(Evaluation.jobset_id == row.id)
                           .order_by(Evaluation.id.desc()), MATRIX_EVALUATIONS, scalars=False,
                           total=queries.evaluations_counted(session, row.id))
    listed = queries.with_counts(session, evaluations.items)
    newest = [e for e, _, _ in evaluations.items]
    if (evaluations.number == 1 and not any(e.hidden for e in newest)) or \
            evaluations.number == evaluations.pages == 1:
        # the matrix's columns are the newest evaluations not hidden: on the first page,
        # these are the page's when none of them is hidden or when it holds them all
        columns = list(reversed([e for e in newest if not e.hidden]))
    else:
        columns = list(reversed(list(session.scalars(
            select(Evaluation).where(Evaluation.jobset_id == row.id,
                                     Evaluation.hidden.is_(False))
            .order_by(Evaluation.id.desc()).limit(MATRIX_EVALUATIONS)))))
    job_filter = query_text("job", 200)
    jobs_page = page_number("jobs_page")
    matrix = queries.job_matrix(session, row.id, columns, job_filter=job_filter,
                                offset=(jobs_page - 1) * MATRIX_JOBS,
                                limit=MATRIX_JOBS)
    inputs = list(session.scalars(select(JobsetInput).where(JobsetInput.jobset_id == row.id)
                                  .order_by(JobsetInput.name)))
    return render_template(
        "jobset.html", project=project_row, jobset=row, evaluations=evaluations,
        listed=listed, matrix=matrix, job_filter=job_filter, jobs_page=jobs_page,
        jobs_pages=max(1, -(-matrix.total_jobs // MATRIX_JOBS)), inputs=inputs,
        channels=queries.channel_list(session, jobset_id=row.id),
        can=allowed_actions(session, current_actor(), project_row.id),
        input_types=list(InputType), settings_form=settings_form,
        input_form=input_form or Form({"input_type": InputType.git.name})), \
        input_form.status if input_form is not None else settings_form.status


@blueprint.post("/jobset/<name:project>/<name:jobset>/trigger")
@page("jobset")
def trigger(project: str, jobset: str) -> ResponseReturnValue:
    session = db_session()
    _, row = _jobset(project, jobset)
    evaluation, created = actions.trigger_evaluation(session, current_actor(), row)
    session.commit()
    flash(f"Evaluation {evaluation.id} queued." if created
          else f"Evaluation {evaluation.id} is already queued or running.", "ok")
    return redirect(url_for("dashboard.evaluation", evaluation_id=evaluation.id))


@blueprint.get("/job/<name:project>/<name:jobset>/<path:job>")
@page("jobset")
def job(project: str, jobset: str, job: str) -> ResponseReturnValue:
    session = db_session()
    project_row, row = _jobset(project, jobset)
    builds = paginate(session, queries.build_list(Build.jobset_id == row.id,
                                                  Build.job_name == job)
                      .order_by(Build.id.desc()), 50, scalars=False)
    if builds.total == 0:
        raise NotFound(f"no job {job} in jobset {project_row.name}/{row.name}")
    return render_template("job.html", project=project_row, jobset=row, job=job,
                           builds=builds, listed=queries.listed(builds.items))


# ---------------------------------------------------------------------------
# channels


@blueprint.get("/channels")
@page("channels")
def channels() -> ResponseReturnValue:
    return _channels_page()


def _channels_page(form: Form | None = None, form_channel: str | None = None
                   ) -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    rows = queries.channel_list(session, actor=actor)
    manageable = {row.channel.project_id for row in rows
                  if Action.jobset_manage in allowed_actions(session, actor,
                                                             row.channel.project_id)}
    return render_template("channels.html", channels=rows, manageable=manageable,
                           channel_form=form or Form(), form_channel=form_channel), \
        form.status if form is not None else 200


@blueprint.post("/channels/<name:channel>/settings")
@page("channels")
def update_channel(channel: str) -> ResponseReturnValue:
    """Manual or automatic mode, and the aggregate job an automatic channel waits for."""
    session = db_session()
    row = service.get_channel(session, channel)
    require_visible(session, current_actor(), row.project_id, f"channel {channel}")
    form = Form.posted("mode", "aggregate_job")
    changes = {"mode": form.get("mode"), "aggregate_job": form.get("aggregate_job") or None}
    if form.run(lambda session: service.update_channel(session, current_actor(), row,
                                                       changes)):
        flash(f"Channel {row.name} saved.", "ok")
        return redirect(url_for("dashboard.channels"))
    return _channels_page(form, row.name)
