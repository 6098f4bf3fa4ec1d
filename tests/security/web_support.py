"""Shared by the web attack tests: a live server holding a real build's rows, and the
app's routes as URLs filled with the ids of that build's objects."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.config import Settings, load_settings
from circus.common.enums import BuildStatus, MemberRole, StepState
from circus.common.models import BuildProduct, Project, ProjectMember, StarredJob, User
from circus.common.nix.derivation import parse_derivation
from circus.common.nix.environment import nix_environ
from circus.server.app import create_app
from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.dashboard.factories import Rows
from tests.helpers.daemons import Daemon

FINISHED_EVALUATIONS = {"completed", "failed", "timed_out", "cancelled"}


def evaluate(ok: Callable[..., Any], evaluator: Daemon, jobset_id: int) -> dict[str, Any]:
    """Trigger ``jobset_id`` through ``ok`` (an API call raising on an error) and wait for
    the evaluation a real circus-evaluator makes of it."""
    started = ok("POST", "/api/v1/evaluations/trigger", {"jobset_id": jobset_id})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        evaluation: dict[str, Any] = ok("GET", f"/api/v1/evaluations/{started['id']}")
        if evaluation["status"] in FINISHED_EVALUATIONS:
            return evaluation
        assert evaluator.alive(), evaluator.log()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"evaluation {started['id']} did not finish:\n"
                         + evaluator.log()[-3000:])


PASSWORD = "security-password-0123"
OUTSIDER_KEY = "outsider-eval-jobset-key-0123456789"
MEMBER_KEY = "member-read-only-key-0123456789abc"
USERS: dict[str, Any] = {
    "users": [{"username": "root", "role": "admin", "password": PASSWORD},
              {"username": "outsider", "role": "eval-jobset", "password": PASSWORD},
              {"username": "member", "role": "read-only", "password": PASSWORD}],
    "api_keys": [{"name": "live-admin", "key": ADMIN_KEY, "role": "admin", "owner": "root"},
                 {"name": "outsider", "key": OUTSIDER_KEY, "role": "eval-jobset",
                  "owner": "outsider"},
                 {"name": "member", "key": MEMBER_KEY, "role": "read-only",
                  "owner": "member"}]}

#: what a malicious build leaves in its output: a page and an image that run script when a
#: browser renders them as active content, and a script file the page could load
HTML = "<html><body><h1>manual</h1><script src='evil.js'></script>" \
       "<script>document.title = 'pwned'</script></body></html>"
SVG = ("<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'>"
       "<script>document.title = 'pwned'</script></svg>")
JS = "document.title = 'pwned';"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class Built:
    drv_path: str
    out: str


def build_malicious_output(nonce: str) -> Built:
    """Really build (nix-build) a derivation whose output holds HTML, SVG and JS."""
    script = (f"mkdir -p $out/doc; echo \"{HTML}\" > $out/doc/index.html; "
              f"echo \"{SVG}\" > $out/doc/logo.svg; echo \"{JS}\" > $out/doc/evil.js; "
              f"echo {nonce} > $out/id")
    expr = (f'derivation {{ name = "circus-security-products-{nonce}"; builder = "/bin/sh"; '
            "system = builtins.currentSystem; args = [ \"-c\" ''export PATH=/usr/bin:/bin; "
            f"{script}'' ]; }}")
    env = nix_environ([])
    drv = subprocess.run(["nix-instantiate", "-E", expr], capture_output=True, text=True,
                         env=env, check=True).stdout.strip()
    subprocess.run(["nix-store", "--realise", drv], capture_output=True, text=True, env=env,
                   check=True)
    outputs = parse_derivation(Path(drv).read_text()).output_paths
    return Built(drv, outputs["out"])


@dataclass
class World:
    """Ids of one project's objects (every kind a route can name)."""

    server: LiveServer
    settings: Settings
    ids: dict[str, Any] = field(default_factory=dict)


def populate_project(session: Session, log_dir: Path, built: Built, *, name: str,
                     hidden: bool) -> dict[str, Any]:
    """Rows of a project whose build made ``built``: evaluations, steps with logs,
    HTML/SVG/directory products, a channel, a star; returns the ids routes take."""
    rows = Rows(session, log_dir)
    project = rows.project(name, hidden=hidden)
    member = session.query(User).filter_by(username="member").one()
    session.add(ProjectMember(project_id=project.id, user_id=member.id,
                              role=MemberRole.member))
    jobset = rows.jobset(project, "main")
    old = rows.evaluation(jobset)
    evaluation = rows.evaluation(jobset)
    build = rows.build(evaluation, "manual", BuildStatus.succeeded,
                       outputs={"out": built.out}, drv_path=built.drv_path)
    rows.link(old, build)
    step = rows.step(build, log="<html><script>document.title='pwned'</script>\n")
    running = rows.build(evaluation, "running", BuildStatus.running)
    rows.step(running, state=StepState.running, log="<script>alert(1)</script>\n",
              compressed=False)
    html = rows.product(build, built.out + "/doc/index.html", subtype="doc")
    svg = rows.product(build, built.out + "/doc/logo.svg", subtype="doc")
    directory = rows.product(build, built.out + "/doc", type="doc", subtype="manual")
    directory.is_directory = True
    directory.default_path = "index.html"
    channel = rows.channel(jobset, f"{name}-unstable", evaluation)
    root = session.query(User).filter_by(username="root").one()
    star = StarredJob(user_id=root.id, jobset_id=jobset.id, job_name="manual")
    session.add(star)
    session.flush()
    assert session.get(BuildProduct, directory.id) is not None
    return {"project": project.name, "project_id": project.id, "jobset": jobset.name,
            "jobset_id": jobset.id, "job": "manual", "evaluation_id": evaluation.id,
            "other_evaluation_id": old.id, "build_id": build.id, "running_build_id": running.id,
            "step_id": step.id, "product_id": html.id, "svg_product_id": svg.id,
            "directory_product_id": directory.id, "channel": channel.name,
            "star_id": star.id, "out": built.out, "hash": Path(built.out).name[:32]}


@contextmanager
def world_server(engine: Engine, database_url: str, redis_url: str, state: Path,
                 **extra: str) -> Iterator[World]:
    with live_server(engine, database_url, redis_url, state, USERS, **extra) as server:
        settings = load_settings(files=[], environ=server.env)
        yield World(server, settings)


def set_hidden(engine: Engine, name: str, hidden: bool) -> None:
    with Session(engine) as session:
        session.query(Project).filter_by(name=name).update({"hidden": hidden})
        session.commit()


def app_for(settings: Settings) -> Flask:
    """The same app the server runs (for its url_map only: no request is made to it)."""
    return create_app(settings)


def get_rules(app: Flask) -> list[tuple[str, str]]:
    """(endpoint, rule) of every GET route."""
    return sorted((rule.endpoint, rule.rule) for rule in app.url_map.iter_rules()
                  if "GET" in (rule.methods or ()))
