"""How values look on every page: status badges, times, durations, sizes, paths.

One table per kind of status, so a colour and an icon mean the same thing
everywhere. Every badge carries its text too (colour is never the only cue).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import quote

from flask import Flask, g, request, url_for
from markupsafe import Markup, escape

from circus.common.enums import BuildStatus, EvaluationStatus, NotificationTaskStatus, StepState

#: css class, icon, label
Style = tuple[str, str, str]

_FAILED = "failed"
BUILD_STYLES: dict[BuildStatus, Style] = {
    BuildStatus.pending: ("queued", "◷", "queued"),
    BuildStatus.running: ("running", "▶", "running"),
    BuildStatus.succeeded: ("ok", "✔", "succeeded"),
    BuildStatus.failed: (_FAILED, "✘", "failed"),
    BuildStatus.dependency_failed: ("depfailed", "⚠", "dependency failed"),
    BuildStatus.aborted: ("aborted", "!", "aborted"),
    BuildStatus.cancelled: ("cancelled", "⊘", "cancelled"),
    BuildStatus.failed_with_output: (_FAILED, "✘", "failed with output"),
    BuildStatus.timeout: (_FAILED, "⌛", "timed out"),
    BuildStatus.cached_failure: ("depfailed", "✘", "cached failure"),
    BuildStatus.unsupported_system: ("aborted", "∅", "unsupported system"),
    BuildStatus.log_limit_exceeded: (_FAILED, "✘", "log limit exceeded"),
    BuildStatus.nar_size_limit_exceeded: (_FAILED, "✘", "output too large"),
    BuildStatus.non_deterministic: (_FAILED, "≠", "non-deterministic"),
    BuildStatus.oom_killed: (_FAILED, "✘", "out of memory"),
}
EVALUATION_STYLES: dict[EvaluationStatus, Style] = {
    EvaluationStatus.pending: ("queued", "◷", "pending"),
    EvaluationStatus.running: ("running", "▶", "evaluating"),
    EvaluationStatus.completed: ("ok", "✔", "completed"),
    EvaluationStatus.failed: (_FAILED, "✘", "failed"),
    EvaluationStatus.cancelled: ("cancelled", "⊘", "cancelled"),
    EvaluationStatus.timed_out: (_FAILED, "⌛", "timed out"),
}
STEP_STYLES: dict[StepState, Style] = {
    StepState.pending: ("queued", "◷", "waiting"),
    StepState.queued: ("queued", "◷", "runnable"),
    StepState.running: ("running", "▶", "building"),
}
TASK_STYLES: dict[NotificationTaskStatus, Style] = {
    NotificationTaskStatus.pending: ("queued", "◷", "pending"),
    NotificationTaskStatus.running: ("running", "▶", "running"),
    NotificationTaskStatus.completed: ("ok", "✔", "sent"),
    NotificationTaskStatus.failed: (_FAILED, "✘", "failed"),
}


def _badge(style: Style, extra: str = "") -> Markup:
    css, icon, label = style
    return Markup('<span class="status s-{css}{extra}"><span class="icon" aria-hidden="true">'
                  '{icon}</span> {label}</span>').format(css=css, icon=icon, label=label,
                                                         extra=extra)


def build_badge(status: BuildStatus | int | None) -> Markup:
    if status is None:
        return Markup("")
    return _build_badge(status if isinstance(status, BuildStatus) else BuildStatus(status))


# a page of builds shows a few statuses hundreds of times: each is formatted once
@cache
def _build_badge(status: BuildStatus) -> Markup:
    return _badge(BUILD_STYLES[status])


def build_icon(status: BuildStatus | int) -> Markup:
    """Just the icon (for dense tables such as the job matrix), label as tooltip."""
    return _build_icon(BuildStatus(status))


@cache
def _build_icon(status: BuildStatus) -> Markup:
    css, icon, label = BUILD_STYLES[status]
    return Markup('<span class="status icon-only s-{css}" title="{label}">'
                  '<span aria-hidden="true">{icon}</span>'
                  '<span class="sr">{label}</span></span>').format(css=css, icon=icon,
                                                                  label=label)


@cache
def evaluation_badge(status: EvaluationStatus) -> Markup:
    return _badge(EVALUATION_STYLES[status])


def step_badge(state: StepState, status: BuildStatus | None) -> Markup:
    if state is StepState.done and status is not None:
        return build_badge(status)
    return _badge(STEP_STYLES.get(state, ("queued", "◷", state.value)))


def task_badge(status: NotificationTaskStatus) -> Markup:
    return _badge(TASK_STYLES[status])


def status_class(status: BuildStatus | int) -> str:
    return _status_class(status if isinstance(status, BuildStatus) else BuildStatus(status))


@cache
def _status_class(status: BuildStatus) -> str:
    return "s-" + BUILD_STYLES[status][0]


# ---------------------------------------------------------------------------
# times, durations, sizes


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def ago(moment: datetime | None, now: datetime | None = None) -> Markup:
    """``<time>`` with a relative text ("5 min ago") and the exact UTC time as tooltip."""
    if moment is None:
        return Markup('<span class="muted">—</span>')
    moment = _aware(moment)
    now = now or datetime.now(UTC)
    delta = (now - moment).total_seconds()
    exact = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    # a page of builds calls this a hundred times, and Markup.format (Python's
    # string.Formatter) was a third of it; every part is made here from a datetime
    # and numbers (no outside text: nothing to escape)
    return Markup(f'<time datetime="{moment.isoformat()}" title="{exact}">'  # noqa: S704
                  f"{relative(delta)}</time>")


def build_when(build: Any, now: datetime | None = None) -> Markup:
    """When a build finished; for an unfinished one, when it started or was queued."""
    if build.completed_at is not None:
        return ago(build.completed_at, now)
    if build.started_at is not None:
        return Markup("started ") + ago(build.started_at, now)
    return Markup("queued ") + ago(build.created_at, now)


def relative(seconds: float) -> str:
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 10:
        return "just now"
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            count = int(seconds // size)
            label = f"{count} {unit}{'s' if unit == 'day' and count != 1 else ''}"
            return f"in {label}" if future else f"{label} ago"
    return "just now"


def duration(value: float | timedelta | None) -> str:
    """``2h 5m``, ``3m 12s``, ``4.2s``; empty for unknown."""
    if value is None:
        return ""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def between(start: datetime | None, end: datetime | None, *, running: bool = False,
            now: datetime | None = None) -> str:
    """Duration from ``start`` to ``end`` (or to now while ``running``)."""
    if start is None:
        return ""
    if end is None:
        if not running:
            return ""
        end = now or datetime.now(UTC)
    return duration(_aware(end) - _aware(start))


def filesize(value: int | None) -> str:
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def store_name(path: str | None) -> str:
    """``/nix/store/<hash>-hello-1.0.drv`` → ``hello-1.0.drv``."""
    if not path:
        return ""
    base = path.rsplit("/", 1)[-1]
    digest, dash, name = base.partition("-")
    return name if dash and len(digest) == 32 else base


def short_rev(rev: str | None) -> str:
    return (rev or "")[:12]


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}%"


# ---------------------------------------------------------------------------
# links in long lists: ``url_for`` builds a URL in ~15 µs, hundreds of times a page


#: what werkzeug's ``path`` and string converters leave unquoted in a URL
_PATH_SAFE = "!$&'()*+,/:;=@"


#: what ``quote(..., safe=_PATH_SAFE)`` leaves as it is (most job names: no call of it)
_UNQUOTED = re.compile(r"[A-Za-z0-9_.~!$&'()*+,/:;=@-]*")


def _prefixes() -> dict[Any, str]:
    """URL prefixes resolved in this request (by endpoint and leading arguments)."""
    found: dict[Any, str] | None = g.get("_url_prefixes")
    if found is None:
        found = g._url_prefixes = {}
    return found


def _id_prefix(endpoint: str, argument: str) -> str:
    prefixes = _prefixes()
    prefix = prefixes.get(endpoint)
    if prefix is None:
        values: dict[str, Any] = {argument: 0}
        prefix = prefixes[endpoint] = url_for(endpoint, **values)[:-1]
    return prefix


def build_url(build_id: int) -> str:
    """``url_for('dashboard.build', build_id=...)``, the rule resolved once a request."""
    return _id_prefix("dashboard.build", "build_id") + str(int(build_id))


def evaluation_url(evaluation_id: int) -> str:
    """``url_for('dashboard.evaluation', evaluation_id=...)``, resolved once a request."""
    return _id_prefix("dashboard.evaluation", "evaluation_id") + str(int(evaluation_id))


def jobset_url(project: str, jobset: str) -> str:
    """``url_for('dashboard.jobset', ...)``, resolved once per jobset and request."""
    prefixes = _prefixes()
    url = prefixes.get(("jobset", project, jobset))
    if url is None:
        url = prefixes["jobset", project, jobset] = url_for(
            "dashboard.jobset", project=project, jobset=jobset)
    return url


def job_url(project: str, jobset: str, job: str) -> str:
    """``url_for('dashboard.job', ...)``, the rule resolved once per jobset and request."""
    prefixes = _prefixes()
    prefix = prefixes.get((project, jobset))
    if prefix is None:
        prefix = prefixes[project, jobset] = url_for(
            "dashboard.job", project=project, jobset=jobset, job="x")[:-1]
    return prefix + (job if _UNQUOTED.fullmatch(job) else quote(job, safe=_PATH_SAFE))


def matrix_row(cells: dict[tuple[str, int], tuple[int, BuildStatus]], job: str,
               evaluation_ids: list[int]) -> Markup:
    """The cells of one job's row of the job matrix: its build in each evaluation, as an
    icon linking to the build, or a dot (built in Python: 500 cells of a page cost the
    template 8 ms)."""
    prefix = escape(_id_prefix("dashboard.build", "build_id"))
    out = []
    for eid in evaluation_ids:
        cell = cells.get((job, eid))
        # the statuses are BuildStatus already (the column's type): no enum call a cell
        out.append(f'<td><a href="{prefix}{int(cell[0])}">{_build_icon(cell[1])}</a></td>'
                   if cell is not None else _NOT_IN_EVALUATION)
    # parts escaped above (the prefix), numbers, or Markup already (the icons): plain
    # string joins, where Markup's % escaped every part again (6 ms a page)
    return Markup("".join(out))  # noqa: S704


_NOT_IN_EVALUATION = '<td><span class="muted" title="not in this evaluation">·</span></td>'


def evaluation_build_rows(builds: list[Any], evaluation_id: int, project: str,
                          jobset: str) -> Markup:
    """The rows of an evaluation's table of builds (``queries.LISTED_BUILD_COLUMNS``),
    built in Python: a page of 100 rows cost the template 2,400 steps and 600 calls
    out of it (~6 ms, a third of the page). A build another evaluation made is tagged."""
    return _build_rows([(build, project, jobset) for build in builds], show_project=False,
                       show_eval=False, tag_reused_for=evaluation_id)


def listed_build_rows(rows: list[Any], show_project: bool, show_eval: bool) -> Markup:
    """The rows of ``macros.builds_table``: ``queries.ListedBuild`` (or bare builds, shown
    without links to their job and jobset)."""
    return _build_rows([(getattr(row, "build", row), getattr(row, "project", None),
                         getattr(row, "jobset", None)) for row in rows],
                       show_project=show_project, show_eval=show_eval)


def _build_rows(rows: list[tuple[Any, str | None, str | None]], *, show_project: bool,
                show_eval: bool, tag_reused_for: int | None = None) -> Markup:
    now = datetime.now(UTC)
    build_prefix = escape(_id_prefix("dashboard.build", "build_id"))
    evaluation_prefix = escape(_id_prefix("dashboard.evaluation", "evaluation_id"))
    out = []
    for build, project, jobset in rows:
        status = build.status  # BuildStatus already (the column type)
        reused = ("" if tag_reused_for is None or build.evaluation_id == tag_reused_for else
                  f' <span class="tag" title="built for evaluation '
                  f'{escape(build.evaluation_id)}">reused</span>')
        name = escape(build.job_name)
        job = (name if project is None or jobset is None else
               f'<a href="{escape(job_url(project, jobset, build.job_name))}">{name}</a>')
        cells = [f'<tr class="{status_class(status)}">',
                 f"    <td>{build_badge(status)}</td>",
                 f'    <td><a href="{build_prefix}{int(build.id)}">#{int(build.id)}</a>'
                 f"{reused}</td>",
                 f'    <td class="job">{job}</td>']
        if show_project:
            cells.append("    <td></td>" if project is None or jobset is None else
                         f'    <td><a href="{escape(jobset_url(project, jobset))}">'
                         f"{escape(project)}:{escape(jobset)}</a></td>")
        cells.append(f"    <td>{escape(build.system)}</td>")
        if show_eval:
            cells.append(f'    <td><a href="{evaluation_prefix}{int(build.evaluation_id)}">'
                         f"{int(build.evaluation_id)}</a></td>")
        took = between(build.started_at, build.completed_at,
                       running=status is BuildStatus.running, now=now)
        cells += [f"    <td>{build_when(build, now)}</td>", f"    <td>{escape(took)}</td>",
                  "  </tr>"]
        out.append("\n".join(cells))
    # every outside value is escaped above; badges and times are Markup already
    return Markup("\n".join(out))  # noqa: S704


def page_url(number: int) -> str:
    """This page with ``page=number`` and every other query argument kept."""
    args: dict[str, Any] = dict(request.view_args or {})
    args.update(request.args.to_dict())
    args["page"] = number
    assert request.endpoint is not None
    return url_for(request.endpoint, **args)


def with_args(**changes: Any) -> str:
    """This page with some query arguments changed (``None`` removes one)."""
    # the path's own parts last: a query argument named like one (``/eval/5?evaluation_id=x``)
    # must not replace it (url_for could not build the link: a 500)
    args: dict[str, Any] = request.args.to_dict()
    args.update(request.view_args or {})
    args.pop("page", None)
    for key, value in changes.items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = value
    assert request.endpoint is not None
    return url_for(request.endpoint, **args)


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(ago=ago, duration=duration, filesize=filesize,
                                 store_name=store_name, short_rev=short_rev, percent=percent,
                                 pair=lambda value: (value, value),
                                 status_from_name=BuildStatus.from_name)
    app.jinja_env.globals.update(
        build_badge=build_badge, build_icon=build_icon, build_when=build_when,
        evaluation_badge=evaluation_badge,
        step_badge=step_badge, task_badge=task_badge, status_class=status_class,
        between=between, page_url=page_url, with_args=with_args, escape=escape,
        build_url=build_url, evaluation_url=evaluation_url, job_url=job_url,
        jobset_url=jobset_url, matrix_row=matrix_row,
        evaluation_build_rows=evaluation_build_rows, listed_build_rows=listed_build_rows)
