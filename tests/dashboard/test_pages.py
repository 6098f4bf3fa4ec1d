"""Every page renders, links its objects together, and handles bad input (test client)."""

from __future__ import annotations

import re

from flask import Flask

from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.models.base import utcnow
from tests.dashboard.conftest import Browser
from tests.dashboard.factories import Rows, World


def html(response: object) -> str:
    return response.get_data(as_text=True)  # type: ignore[attr-defined, no-any-return]


def links(page: str) -> set[str]:
    return set(re.findall(r'href="([^"#]+)', page))


def test_every_page_renders_for_an_admin(as_admin: Browser, world: World) -> None:
    w = world
    paths = ["/", "/projects", "/project/demo", "/jobset/demo/main", "/job/demo/main/tests",
             f"/eval/{w.evaluation.id}", f"/eval/{w.evaluation.id}?status=all",
             f"/build/{w.succeeded.id}", f"/build/{w.failed.id}",
             f"/build/{w.dependency_failed.id}", f"/build/{w.running.id}",
             f"/build/{w.queued.id}", "/queue", "/machines", "/stats", "/channels",
             "/search?q=demo", "/search?q=tests", f"/search?q={w.failed.id}", "/news",
             "/settings", "/admin", "/admin/users", "/admin/builders", "/admin/notifications",
             "/admin/notifications?status=failed", "/admin/audit", "/admin/config"]
    for path in paths:
        response = as_admin.get(path)
        assert response.status_code == 200, (path, html(response)[:2000])
        assert response.mimetype == "text/html"


def test_objects_link_to_each_other(as_admin: Browser, world: World) -> None:
    w = world
    build = f"/build/{w.failed.id}"
    evaluation = f"/eval/{w.evaluation.id}"
    # project → jobset → evaluation → build, and back up through the crumbs
    assert "/jobset/demo/main" in links(html(as_admin.get("/project/demo")))
    assert evaluation in links(html(as_admin.get("/jobset/demo/main")))
    evaluation_page = html(as_admin.get(evaluation))
    assert build in links(evaluation_page)
    assert {"/project/demo", "/jobset/demo/main"} <= links(evaluation_page)
    build_page = html(as_admin.get(build))
    assert {evaluation, "/jobset/demo/main", "/project/demo", "/job/demo/main/tests"} <= \
        links(build_page)
    # the job matrix links every cell to its build
    matrix = html(as_admin.get("/jobset/demo/main"))
    for made in (w.succeeded, w.failed, w.running, w.queued):
        assert f"/build/{made.id}" in links(matrix)
    # the job page lists the job's builds; home shows recent builds and evaluations
    assert build in links(html(as_admin.get("/job/demo/main/tests")))
    home = html(as_admin.get("/"))
    assert {build, evaluation, f"/build/{w.running.id}"} <= links(home)


def test_status_badges_are_consistent(as_admin: Browser, world: World) -> None:
    evaluation = html(as_admin.get(f"/eval/{world.evaluation.id}?status=all"))
    build = html(as_admin.get(f"/build/{world.failed.id}"))
    badge = '<span class="status s-failed"><span class="icon" aria-hidden="true">✘</span> failed'
    assert badge in evaluation
    assert badge in build
    assert "s-depfailed" in evaluation
    assert "dependency failed" in evaluation


def test_evaluation_groups_builds_and_shows_eval_errors(as_admin: Browser,
                                                       world: World) -> None:
    page = html(as_admin.get(f"/eval/{world.evaluation.id}"))
    # failures first, with counts per group
    assert re.search(r'aria-current="true" class="tab t-failed">Failed <span class="n">2', page)
    assert f"/build/{world.failed.id}" in page
    assert f"/build/{world.succeeded.id}" not in page
    assert "attribute &#39;nope&#39; missing" in page
    succeeded = html(as_admin.get(f"/eval/{world.evaluation.id}?status=succeeded"))
    assert f"/build/{world.succeeded.id}" in succeeded
    # the build reused from the older evaluation is listed and marked
    assert "reused" in succeeded
    # an unknown group falls back to the default
    assert as_admin.get(f"/eval/{world.evaluation.id}?status=bogus").status_code == 200


def test_build_page_shows_the_failed_dependency_and_its_log(as_admin: Browser,
                                                           world: World) -> None:
    page = html(as_admin.get(f"/build/{world.dependency_failed.id}"))
    assert "What failed" in page
    assert "a dependency" in page
    assert "because <code>dep.drv</code> failed" in page
    assert "out of cheese" in page
    succeeded = html(as_admin.get(f"/build/{world.succeeded.id}"))
    assert f"/build/{world.succeeded.id}/download/" in succeeded
    assert "closure-size" in succeeded
    assert "2.0 KiB" in succeeded


def test_long_logs_show_their_end_and_the_whole_log_is_a_click_away(
        as_admin: Browser, world: World, rows: Rows) -> None:
    lines = [f"line {i:06d}" for i in range(20000)]
    build = rows.build(world.evaluation, "chatty", BuildStatus.failed)
    rows.step(build, log="\n".join(lines) + "\n")
    rows.db.commit()
    page = html(as_admin.get(f"/build/{build.id}"))
    assert "Showing the end of the log." in page
    assert "line 019999" in page
    assert "line 000001" not in page
    whole = as_admin.get(f"/build/{build.id}/log")
    assert whole.mimetype == "text/plain"
    assert html(whole).splitlines() == lines


def test_pagination_of_an_evaluation_with_many_builds(as_admin: Browser, world: World,
                                                      rows: Rows) -> None:
    for i in range(130):
        rows.build(world.evaluation, f"many-{i:03d}", BuildStatus.succeeded)
    rows.db.commit()
    base = f"/eval/{world.evaluation.id}?status=succeeded"
    first = html(as_admin.get(base))
    assert "1\u2013100 of 132" in first
    assert "many-000" in first
    second = html(as_admin.get(base + "&page=2"))
    assert "101\u2013132 of 132" in second
    assert "many-129" in second
    assert "many-000" not in second
    # nonsense page numbers are page 1 or an empty last page, never an error
    for bad in ("abc", "-1", "0", "99999999999999999999", "9999999"):
        assert as_admin.get(base + f"&page={bad}").status_code == 200


def test_bad_urls_and_input_answer_html_errors(as_admin: Browser, world: World) -> None:
    for path, code in (("/build/999999999", 404), ("/eval/999999999", 404),
                       ("/project/nope", 404), ("/jobset/demo/nope", 404),
                       ("/job/demo/main/no-such-job", 404),
                       (f"/build/{world.failed.id}?step=99999", 404),
                       (f"/build/{world.failed.id}/download/99999", 404),
                       (f"/eval/{world.evaluation.id}?compare=x", 400),
                       (f"/eval/{world.evaluation.id}?compare=99999999", 404)):
        response = as_admin.get(path)
        assert response.status_code == code, path
        assert response.mimetype == "text/html", path
        assert "<h1>" in html(response)
    for path in ("/search?q=%00", "/search?q=" + "x" * 5000, "/jobset/demo/main?job=%00x",
                 "/jobset/demo/main?jobs_page=99999999999", "/admin/audit?action=%00",
                 "/admin/users?q=%25_"):
        assert as_admin.get(path).status_code == 200, path


def test_query_arguments_named_like_a_path_part_change_nothing(as_admin: Browser,
                                                                world: World) -> None:
    # the pages' own links are built from the path and the query: a query argument named
    # like a part of the path failed to build them (a 500 for any visitor)
    evaluation = f"/eval/{world.evaluation.id}"
    for path in (f"{evaluation}?evaluation_id=%00&status=all",
                 f"{evaluation}?evaluation_id=1&status=all",
                 "/jobset/demo/main?project=nope&jobset=%00&job=t",
                 "/job/demo/main/tests?job=x&project=%ff"):
        response = as_admin.get(path)
        assert response.status_code == 200, path
    page = html(as_admin.get(f"{evaluation}?evaluation_id=1&status=all"))
    assert f'href="{evaluation}?' in page
    assert 'href="/eval/1?' not in page


def test_hidden_projects_are_invisible_to_non_admins(as_admin: Browser, as_viewer: Browser,
                                                    world: World, rows: Rows) -> None:
    world.project.hidden = True
    rows.db.commit()
    assert as_viewer.get("/project/demo").status_code == 404
    assert as_viewer.get(f"/build/{world.failed.id}").status_code == 404
    assert "/project/demo" not in html(as_viewer.get("/projects"))
    assert "demo-unstable" not in html(as_viewer.get("/channels"))
    assert f"/build/{world.failed.id}" not in html(as_viewer.get("/"))
    assert f"/eval/{world.evaluation.id}" not in html(as_viewer.get("/"))
    assert "/jobset/demo/main" not in html(as_viewer.get("/search?q=main"))
    assert as_admin.get("/project/demo").status_code == 200
    assert f"/build/{world.failed.id}" in html(as_admin.get("/"))


def test_machines_page_shows_workers_agents_and_builders(as_viewer: Browser, rows: Rows,
                                                        world: World) -> None:
    from datetime import timedelta

    from circus.common.models import BuilderSession, RemoteBuilder, ServiceHeartbeat
    from circus.common.models.base import utcnow

    now = utcnow()
    rows.db.add_all([
        ServiceHeartbeat(service="queue-runner@build1", kind="queue-runner", hostname="build1",
                         pid=42, version="0.1.0", started_at=now - timedelta(hours=1),
                         last_heartbeat=now, details={
                             "workers": 4, "running_batches": 1, "dispatcher": True,
                             "capabilities": [{"systems": ["x86_64-linux"],
                                               "supported_features": ["kvm"],
                                               "mandatory_features": []}]}),
        ServiceHeartbeat(service="evaluator@old", kind="evaluator", hostname="old",
                         version="0.0.9", started_at=now - timedelta(days=2),
                         last_heartbeat=now - timedelta(hours=3), details={}),
        BuilderSession(machine_id="m-1", name="arm-box", hostname="arm.example",
                       systems=["aarch64-linux"], supported_features=["big-parallel"],
                       mandatory_features=[], proto_version=1, connected=True, cpu_count=16,
                       max_jobs=8, current_jobs=3, load1=2.5, load5=2.0, load15=1.5,
                       cpu_psi_avg10=12.5, mem_psi_avg10=0.0, io_psi_avg10=3.25,
                       mem_total=16 << 30, mem_used=4 << 30, store_free=100 << 30,
                       builds_succeeded=10, builds_failed=2, last_seen=now),
        RemoteBuilder(name="ssh-box", ssh_uri="ssh://nix@ssh-box", systems=["x86_64-linux"],
                      supported_features=[], mandatory_features=[], max_jobs=2,
                      consecutive_failures=3, disabled_until=now + timedelta(minutes=5),
                      last_failure="connection refused"),
    ])
    rows.db.commit()
    page = html(as_viewer.get("/machines"))
    for text in ("queue-runner@build1", "4 workers, 1 building", "x86_64-linux · kvm",
                 "runs the dispatcher", "evaluator@old", "stale", "arm-box", "3/8",
                 "2.50 / 2.00 / 1.50", "12.5% / 0.0% / 3.2%", "4.0 GiB of 16.0 GiB",
                 "100.0 GiB", "ssh-box", "backing off", "connection refused",
                 "<code>localhost</code>: 1 step"):
        assert text in page, text


def test_stats_counts_the_queue_runners_local_workers_as_machines(
        as_admin: Browser, rows: Rows, world: World) -> None:
    """A system built only by the queue runner's own slots (``circus up``) showed
    "Machines 0" on /stats: only SSH builders and agents were counted. A queue runner (or
    remote Celery worker) with a fresh heartbeat naming local capabilities counts once;
    a stale one, or one without local workers (agents and SSH builders only), does not."""
    from datetime import timedelta

    from circus.common.models import BuilderSession, RemoteBuilder, ServiceHeartbeat
    from circus.common.models.base import utcnow

    now = utcnow()

    def runner(name: str, systems: list[str], workers: int, age: timedelta
               ) -> ServiceHeartbeat:
        capabilities = [{"systems": systems, "supported_features": [],
                         "mandatory_features": []}] if workers else []
        return ServiceHeartbeat(service=f"queue-runner@{name}", kind="queue-runner",
                                hostname=name, pid=1, version="0.1.0",
                                started_at=now - timedelta(hours=1),
                                last_heartbeat=now - age,
                                details={"workers": workers, "capabilities": capabilities})

    rows.db.add_all([
        runner("local", ["local-linux", "both-linux"], 4, timedelta(seconds=5)),
        runner("gone", ["local-linux", "stale-linux"], 4, timedelta(hours=1)),
        runner("gateway", ["local-linux"], 0, timedelta(seconds=5)),
        BuilderSession(machine_id="m-1", name="agent-1", hostname="a", systems=["both-linux"],
                       supported_features=[], mandatory_features=[], proto_version=1,
                       connected=True, max_jobs=2, current_jobs=0, last_seen=now),
        RemoteBuilder(name="ssh-1", ssh_uri="ssh://ssh-1", systems=["both-linux"],
                      supported_features=[], mandatory_features=[], max_jobs=1),
    ])
    rows.db.commit()
    page = re.sub(r"\s+", " ", html(as_admin.get("/stats")))
    machines = dict(re.findall(r'<tr><td>([a-z-]+)</td>(?:<td class="num">\d+</td>){4}'
                               r'<td class="num">(\d+)</td></tr>', page))
    assert machines.get("local-linux") == "1", page
    assert machines.get("both-linux") == "3", page
    assert "stale-linux" not in machines
    api = as_admin.get("/api/v1/metrics/systems").get_json()["systems"]
    assert {s["system"]: s["machines"] for s in api if s["system"].endswith("-linux")
            and s["system"] != "x86_64-linux"} == {"local-linux": 1, "both-linux": 3}


def test_compare_with_the_previous_evaluation(as_admin: Browser, world: World) -> None:
    page = html(as_admin.get(f"/eval/{world.evaluation.id}?compare={world.old.id}"))
    assert "5 new, 1 removed, 0 changed, 1 unchanged jobs." in page
    removed = page[page.index("<h3>Removed jobs</h3>"):]
    assert "removed-job" in removed[:removed.index("</div>")]


def test_job_matrix_pages_and_filters_the_newest_evaluations_jobs(rows: Rows) -> None:
    """The matrix rows are the jobs of the newest completed evaluation shown (a reused
    build counts, a job only an older one had does not), filtered and paged by name."""
    from circus.common.enums import EvaluationStatus
    from circus.server.dashboard.queries import job_matrix

    jobset = rows.jobset(rows.project())
    old = rows.evaluation(jobset)
    rows.build(old, "dropped", BuildStatus.succeeded)
    kept = rows.build(old, "lib.kept", BuildStatus.succeeded)
    new = rows.evaluation(jobset)
    rows.link(new, kept)
    for name in ("lib.alpha", "lib.beta", "tools.gamma"):
        rows.build(new, name, BuildStatus.failed)
    running = rows.evaluation(jobset, EvaluationStatus.running)
    rows.build(running, "only.while.running")
    rows.db.commit()
    shown = [old, new, running]

    def matrix(job_filter: str = "", offset: int = 0, limit: int = 50) -> tuple[list[str], int]:
        found = job_matrix(rows.db, jobset.id, shown, job_filter=job_filter, offset=offset,
                           limit=limit)
        return found.jobs, found.total_jobs

    assert matrix() == (["lib.alpha", "lib.beta", "lib.kept", "tools.gamma"], 4)
    assert matrix(offset=1, limit=2) == (["lib.beta", "lib.kept"], 4)
    assert matrix(offset=10) == ([], 4)
    assert matrix("LIB.") == (["lib.alpha", "lib.beta", "lib.kept"], 3)
    assert matrix("lib.", offset=2) == (["lib.kept"], 3)
    assert matrix("lib.", offset=10) == ([], 3)
    assert matrix("%") == ([], 0)
    cells = job_matrix(rows.db, jobset.id, shown, job_filter="kept", offset=0, limit=50).cells
    assert cells == {("lib.kept", old.id): (kept.id, BuildStatus.succeeded),
                     ("lib.kept", new.id): (kept.id, BuildStatus.succeeded)}


def test_list_links_are_the_ones_url_for_builds(app: Flask) -> None:
    """Lists build their links from a prefix resolved once (url_for cost 15 µs a link);
    a job name is quoted as the route's converter quotes it, whatever it holds."""
    from flask import url_for

    from circus.server.dashboard.formatting import build_url, evaluation_url, job_url, jobset_url

    names = ["tests", "pkgs.hello", "a b/c?d#e%f&g'h\"<i>", "ünï/cødé", "x;y=z@w+v~",
             "tab\tnl\n", "[x]{y}|^`"]
    with app.test_request_context("/"):
        for project, jobset in (("demo", "main"), ("other-p", "j.2"), ("demo", "main")):
            assert jobset_url(project, jobset) == url_for(
                "dashboard.jobset", project=project, jobset=jobset)
            for job in names:
                assert job_url(project, jobset, job) == url_for(
                    "dashboard.job", project=project, jobset=jobset, job=job)
        for some_id in (1, 42, 9_007_199_254_740_993):
            assert build_url(some_id) == url_for("dashboard.build", build_id=some_id)
            assert evaluation_url(some_id) == url_for("dashboard.evaluation",
                                                      evaluation_id=some_id)


def test_job_matrix_columns_are_the_newest_evaluations_not_hidden(as_admin: Browser,
                                                                  rows: Rows) -> None:
    """The first page of evaluations lends its rows to the matrix when it can; a hidden
    evaluation is listed but never a column, on any page."""
    project = rows.project("cols")
    jobset = rows.jobset(project)
    made = [rows.evaluation(jobset) for _ in range(13)]
    for evaluation in made:
        rows.build(evaluation, f"job{evaluation.id}", BuildStatus.succeeded)
    rows.db.commit()

    def columns(query: str = "") -> list[int]:
        page = html(as_admin.get(f"/jobset/cols/main{query}"))
        return [int(eid) for eid in re.findall(r'title="evaluation (\d+), ', page)]

    ids = [e.id for e in made]
    assert columns() == ids[-10:]
    assert columns("?page=2") == ids[-10:]
    made[-3].hidden = True
    rows.db.commit()
    assert columns() == ids[-11:-3] + ids[-2:]
    assert columns("?page=2") == ids[-11:-3] + ids[-2:]
    assert f"/eval/{made[-3].id}" in links(html(as_admin.get("/jobset/cols/main")))
    # one page holding every evaluation, one of them hidden
    small = rows.jobset(project, "small")
    few = [rows.evaluation(small) for _ in range(3)]
    for evaluation in few:
        rows.build(evaluation, "same", BuildStatus.succeeded)
    few[0].hidden = True
    rows.db.commit()
    page = html(as_admin.get("/jobset/cols/small"))
    assert [int(e) for e in re.findall(r'title="evaluation (\d+), ', page)] == \
        [few[1].id, few[2].id]
    assert f"/eval/{few[0].id}" in links(page)


def test_jobset_page_says_why_the_check_or_the_newest_evaluation_failed(
        as_admin: Browser, rows: Rows) -> None:
    """A jobset naming a missing flake attribute fails in the evaluation, not in the
    check: the jobset page shows that evaluation's message, not only "(error)"."""
    project = rows.project("why")
    jobset = rows.jobset(project)
    rows.evaluation(jobset)
    failed = rows.evaluation(jobset, EvaluationStatus.failed, finished_at=utcnow(),
                             error_message="error: flake does not provide attribute 'pkgs'")
    jobset.last_check_outcome = "error"
    rows.db.commit()
    page = html(as_admin.get("/jobset/why/main"))
    problem = page.split('class="problem"')[1].split("</section>")[0]
    assert "Last evaluation failed" in problem
    assert "does not provide attribute &#39;pkgs&#39;" in problem
    assert f"/eval/{failed.id}" in links(problem)
    # a newer evaluation that worked: nothing to report
    rows.evaluation(jobset)
    rows.db.commit()
    assert 'class="problem"' not in html(as_admin.get("/jobset/why/main"))
    # a failed check (no such branch) is the jobset's own error, shown once
    jobset.error_message = "branch 'nosuch' does not exist"
    rows.evaluation(jobset, EvaluationStatus.failed, error_message="not this one")
    rows.db.commit()
    page = html(as_admin.get("/jobset/why/main"))
    assert page.count('class="problem"') == 1
    assert "Last check failed" in page
    assert "not this one" not in page


def test_home_tiles_count_the_queue_and_the_machines(as_admin: Browser, rows: Rows,
                                                    world: World) -> None:
    """The summary tiles (one statement each for the queue and the machines) count
    pending and running builds, active steps by state, connected agents' jobs and the
    SSH builders."""
    from sqlalchemy import func, select

    from circus.common.enums import StepState
    from circus.common.models import Build, BuilderSession, RemoteBuilder, Step
    from circus.common.models.base import utcnow

    def session(name: str, connected: bool, current: int, slots: int) -> BuilderSession:
        return BuilderSession(machine_id=name, name=name, hostname="h", systems=["x"],
                              supported_features=[], mandatory_features=[], proto_version=1,
                              connected=connected, max_jobs=slots, current_jobs=current,
                              last_seen=utcnow())

    rows.step(world.queued, state=StepState.queued, drv_path="/nix/store/x-more.drv")
    rows.step(world.queued, state=StepState.pending, drv_path="/nix/store/x-wait.drv")
    rows.db.add_all([session("a1", True, 2, 4), session("a2", True, 1, 8),
                     session("a3", False, 5, 5),
                     RemoteBuilder(name="on", ssh_uri="ssh://on", systems=["x"],
                                   supported_features=[], mandatory_features=[], max_jobs=1),
                     RemoteBuilder(name="off", ssh_uri="ssh://off", systems=["x"],
                                   supported_features=[], mandatory_features=[], max_jobs=1,
                                   enabled=False)])
    rows.db.commit()

    def count(query: object) -> int:
        return int(rows.db.scalar(query) or 0)  # type: ignore[call-overload]

    pending, running = (count(select(func.count()).select_from(Build).where(
        Build.status == status)) for status in (BuildStatus.pending, BuildStatus.running))
    steps = {state: count(select(func.count()).select_from(Step).where(Step.state == state))
             for state in (StepState.queued, StepState.pending, StepState.running)}
    assert pending
    assert running
    assert all(steps.values()), steps
    page = re.sub(r"\s+", " ", html(as_admin.get("/")))
    for text in (f'<span class="big">{pending}</span> builds queued',
                 f"<small>{steps[StepState.queued]} steps runnable · "
                 f"{steps[StepState.pending]} waiting</small>",
                 f'<span class="big">{running}</span> builds running',
                 f"<small>{steps[StepState.running]} steps building</small>",
                 '<span class="big">2</span> agents connected',
                 "<small>3/12 jobs · 1/2 SSH builders</small>"):
        assert text in page, text


def test_names_a_repository_chooses_are_escaped_in_the_rows_built_in_python(
        as_admin: Browser, rows: Rows) -> None:
    """Job names and systems come from the evaluated Nix code: the build tables and the
    job matrix (rendered in Python, not by the templates' autoescaping) escape them."""
    attack = '"><img src=x onerror=alert(1)>'
    project = rows.project("esc")
    jobset = rows.jobset(project, "main")
    evaluation = rows.evaluation(jobset)
    build = rows.build(evaluation, f"pkgs.{attack}", BuildStatus.failed,
                       system=f"x86_64-linux{attack}")
    rows.db.commit()
    for path in ("/", "/project/esc", "/jobset/esc/main", f"/eval/{evaluation.id}",
                 f"/eval/{evaluation.id}?status=all", "/jobset/esc/main?job=pkgs"):
        page = html(as_admin.get(path))
        assert "<img src=x" not in page, path
        assert f"/build/{build.id}" in links(page), path
    assert "&lt;img src=x onerror=alert(1)&gt;" in html(as_admin.get(f"/eval/{evaluation.id}"))
