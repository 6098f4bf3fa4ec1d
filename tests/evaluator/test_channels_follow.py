"""Channels that follow their jobset (issue 18, item 1), end to end on real Nix and
PostgreSQL: real evaluations of a git repository, real builds by the queue runner's
dispatcher and local worker, and the Hydra-compatible channel endpoints consumed by
``nix-env``/``nix-instantiate``."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from circus.auth.actor import Actor
from circus.common.config import Settings
from circus.common.enums import ActorKind, BuildStatus
from circus.common.models import AuditLog, Channel, Jobset
from circus.common.nix.environment import current_system
from circus.projects import service
from circus.projects.channels import advance_channels
from circus.server.app import create_app
from tests.evaluator.conftest import World, completed
from tests.helpers.gitrepo import GitRepo
from tests.queue_runner.conftest import Driver, driver, qr_settings  # noqa: F401

ADMIN = Actor.system("test")

RELEASE = """
let
  system = "@SYSTEM@";
  mk = name: extra: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo @NONCE@ @ROUND@ ${name} > $out" ];
  } // extra);
  hello = mk "hello-1.0" { };
in {
  inherit hello;
  tools.fmt = mk "fmt-2.0" { };
  @BROKEN@
  release = mk "release" { _hydraAggregate = true; constituents = [ hello ]; };
}
"""
BROKEN = 'broken = mk "broken" { args = [ "-c" "exit 1" ]; };'


def _commit(repo: GitRepo, nonce: str, round_: str, *, broken: bool = False) -> str:
    text = (RELEASE.replace("@SYSTEM@", current_system()).replace("@NONCE@", nonce)
            .replace("@ROUND@", round_).replace("@BROKEN@", BROKEN if broken else ""))
    return repo.commit({"release.nix": text}, f"round {round_}")


def _channels(world: World) -> dict[str, int | None]:
    with world.factory() as session:
        return dict(session.execute(select(Channel.name, Channel.evaluation_id)).tuples().all())


def _evaluate_and_build(world: World, build: Driver, jobset_id: int) -> tuple[int, dict[str, int]]:
    evaluation = completed(world.evaluate(jobset_id))
    ids = {name: b.id for name, b in world.builds(evaluation.id).items()}
    build.run(list(ids.values()), timeout=60)
    return evaluation.id, ids


def _nixexprs(client: FlaskClient, name: str, into: Path) -> Path:
    response = client.get(f"/channel/{name}/nixexprs.tar.xz")
    assert response.status_code == 200, response.data
    with tarfile.open(fileobj=io.BytesIO(response.data)) as archive:
        archive.extractall(into, filter="data")
    return into / name


def test_automatic_channels_follow_good_evaluations_and_are_served(
        world: World, git_repo: Callable[..., GitRepo], nonce: str,
        driver: Callable[..., Driver], engine: Engine, eval_settings: Settings,  # noqa: F811
        nix_env: dict[str, str], tmp_path: Path) -> None:
    repo = git_repo()
    first = _commit(repo, nonce, "1")
    jobset_id = world.jobset(repo.url, flake=False, expression="release.nix")
    with world.factory() as session, session.begin():
        jobset = session.get_one(Jobset, jobset_id)
        service.create_channel(session, ADMIN, jobset, name="follow", mode="automatic")
        service.create_channel(session, ADMIN, jobset, name="gated", mode="automatic",
                               aggregate_job="release")
        service.create_channel(session, ADMIN, jobset, name="pinned")
    build = driver()

    # round 1: everything succeeds -> both automatic channels move, the manual one does not
    evaluation = completed(world.evaluate(jobset_id))
    assert _channels(world) == {"follow": None, "gated": None, "pinned": None}  # still building
    ids = {name: b.id for name, b in world.builds(evaluation.id).items()}
    assert set(build.run(list(ids.values()), timeout=60).values()) == {BuildStatus.succeeded}
    eval1 = evaluation.id
    assert _channels(world) == {"follow": eval1, "gated": eval1, "pinned": None}

    # round 2: a failing job -> "follow" stays, "gated" (only the aggregate counts) moves
    second = _commit(repo, nonce, "2", broken=True)
    eval2, _ = _evaluate_and_build(world, build, jobset_id)
    assert world.builds(eval2)["broken"].status is BuildStatus.failed
    assert world.builds(eval2)["release"].status is BuildStatus.succeeded
    assert _channels(world) == {"follow": eval1, "gated": eval2, "pinned": None}

    with world.factory() as session:
        moves = session.execute(select(AuditLog.actor_kind, AuditLog.actor, AuditLog.target,
                                       AuditLog.details)
                                .where(AuditLog.action == "channel.advance")
                                .order_by(AuditLog.id)).all()
    # (which channel moved first in round 1 depends on which build finished last)
    assert sorted((m.actor_kind, m.actor, m.target, m.details["evaluation_id"])
                  for m in moves) == [
        (ActorKind.system, "channels", "channel:follow", eval1),
        (ActorKind.system, "channels", "channel:gated", eval1),
        (ActorKind.system, "channels", "channel:gated", eval2),
    ]
    # idempotent: nothing newer is good, nothing moves, no audit row
    with world.factory() as session, session.begin():
        assert advance_channels(session, jobset_id) == []

    # the Hydra-compatible endpoints serve each channel's evaluation to real Nix
    client = create_app(eval_settings, engine=engine).test_client()
    assert client.get("/channel/follow/git-revision").data.decode() == first
    assert client.get("/channel/gated/git-revision").data.decode() == second
    assert client.get("/channel/pinned/git-revision").status_code == 404
    follow = _nixexprs(client, "follow", tmp_path / "a")
    out = subprocess.run(["nix-env", "-qaP", "--json", "--out-path", "-f", str(follow)],
                         env=nix_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    hello1 = world.builds(eval1)["hello"]
    assert listed["hello"]["name"] == "hello-1.0"
    assert listed["hello"]["outputs"] == {"out": hello1.outputs[0].path}
    assert listed["tools.fmt"]["name"] == "fmt-2.0"
    gated = _nixexprs(client, "gated", tmp_path / "b")
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E",
                          f"builtins.attrNames (import {gated} {{}})"],
                         env=nix_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "broken" not in json.loads(out.stdout)  # failed jobs are not in a channel
    hello2 = world.builds(eval2)["hello"].outputs[0].path
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E",
                          f"(import {gated} {{}}).hello.outPath"],
                         env=nix_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == hello2 != hello1.outputs[0].path

    # round 3: green again -> "follow" catches up past the failing evaluation
    _commit(repo, nonce, "3")
    eval3, _ = _evaluate_and_build(world, build, jobset_id)
    assert _channels(world) == {"follow": eval3, "gated": eval3, "pinned": None}

    # round 4: the same derivations as round 3 (reused builds, already succeeded):
    # the evaluation is good when it completes, no build has to finish
    repo.commit({"README": "docs only"}, "round 4")
    eval4 = completed(world.evaluate(jobset_id)).id
    assert _channels(world) == {"follow": eval4, "gated": eval4, "pinned": None}

    # round 5 fails; promoted by hand to it, the channel never goes back to round 4
    _commit(repo, nonce, "5", broken=True)
    eval5, _ = _evaluate_and_build(world, build, jobset_id)
    assert _channels(world)["follow"] == eval4
    with world.factory() as session, session.begin():
        channel = session.scalars(select(Channel).where(Channel.name == "follow")).one()
        service.promote_channel(session, ADMIN, channel, eval5)
        assert advance_channels(session, jobset_id) == []
    assert _channels(world)["follow"] == eval5
