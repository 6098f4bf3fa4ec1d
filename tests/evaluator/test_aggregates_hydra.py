"""Aggregates with Hydra's semantics, evaluated by real Nix (the built-in walker and
the nix-eval-jobs path): glob constituents, missing/null/broken constituents and
cycles fail the aggregate with Hydra's messages; other jobs are unaffected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from circus.common.enums import BuildStatus
from circus.common.errors import Conflict
from circus.common.models import Build, BuildConstituent
from circus.common.nix.environment import current_system
from circus.queue_runner.service import restart_build, restart_builds
from tests.evaluator.conftest import World, completed
from tests.evaluator.test_nix_eval_jobs import RECORDING
from tests.helpers.gitrepo import GitRepo
from tests.queue_runner.conftest import Driver, driver, qr_settings  # noqa: F401

PRELUDE = """
let
  system = "@SYSTEM@";
  mk = name: extra: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo @NONCE@ ${name} > $out" ];
  } // extra);
  agg = name: constituents: mk name { _hydraAggregate = true; inherit constituents; };
  glob = name: constituents: mk name {
    _hydraAggregate = true; _hydraGlobConstituents = true; inherit constituents; };
in
"""


def _jobset(world: World, git_repo: Callable[..., GitRepo], nonce: str, body: str) -> int:
    repo = git_repo()
    text = (PRELUDE + body).replace("@SYSTEM@", current_system()).replace("@NONCE@", nonce)
    repo.commit({"release.nix": text})
    return world.jobset(repo.url, flake=False, expression="release.nix")


def _members(world: World, build: Build) -> list[str]:
    with world.factory() as session:
        return sorted(session.scalars(
            select(Build.job_name).join(BuildConstituent,
                                        BuildConstituent.constituent_id == Build.id)
            .where(BuildConstituent.aggregate_id == build.id)).all())


def test_glob_constituents_expand_and_an_unmatched_glob_fails_the_aggregate(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    jobset_id = _jobset(world, git_repo, nonce, """{
      packages = { a = mk "a" { }; b = mk "b" { }; };
      tool = mk "tool" { };
      release = glob "release" [ "packages.*" ];
      everything = glob "everything" [ "*" ];
      literal = glob "literal" [ "tool" ];
      gated = glob "gated" [ "packages.*" "tests.*" ];
    }""")
    evaluation = completed(world.evaluate(jobset_id))
    builds = world.builds(evaluation.id)

    assert _members(world, builds["release"]) == ["packages.a", "packages.b"]
    assert builds["release"].status is BuildStatus.pending
    # "*" matches every other job (aggregates too) but never the aggregate itself
    assert _members(world, builds["everything"]) == [
        "gated", "literal", "packages.a", "packages.b", "release", "tool"]
    assert _members(world, builds["literal"]) == ["tool"]
    gated = builds["gated"]
    assert gated.status is BuildStatus.failed
    assert gated.error_message == "tests.*: constituent glob pattern had no matches"
    assert gated.completed_at is not None
    # the other jobs are unaffected, and the evaluation has no job errors
    assert all(b.status is BuildStatus.pending for n, b in builds.items() if n != "gated")
    assert evaluation.errors == []


def test_missing_null_and_broken_named_constituents_fail_the_aggregate(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    jobset_id = _jobset(world, git_repo, nonce, """{
      good = mk "good" { };
      nothing = null;
      broken = throw "this constituent is broken";
      ok = agg "ok" [ "good" ];
      missing = agg "missing" [ "good" "x" ];
      nulled = agg "nulled" [ "nothing" ];
      failing = agg "failing" [ "broken" ];
      globbed = glob "globbed" [ "bro*" ];
    }""")
    evaluation = completed(world.evaluate(jobset_id))
    builds = world.builds(evaluation.id)
    errors = {e.job_name: e.message for e in evaluation.errors}
    assert set(errors) == {"broken"}
    assert "this constituent is broken" in errors["broken"]

    assert builds["ok"].status is BuildStatus.pending
    assert _members(world, builds["ok"]) == ["good"]
    missing = builds["missing"]
    assert (missing.status, missing.error_message) == (BuildStatus.failed, "x: does not exist")
    assert _members(world, missing) == ["good"]  # what exists is still linked
    assert builds["nulled"].error_message == "nothing: does not exist"
    for name in ("failing", "globbed"):
        assert builds[name].status is BuildStatus.failed
        assert builds[name].error_message == f"broken: {errors['broken']}"
    assert builds["good"].status is BuildStatus.pending


def test_aggregate_cycles_are_rejected_at_evaluation(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    jobset_id = _jobset(world, git_repo, nonce, """{
      leaf = mk "leaf" { };
      a = agg "a" [ "b" "leaf" ];
      b = agg "b" [ "a" ];
      star = glob "star" [ "*" ];
      other = glob "other" [ "st*" ];
      outside = agg "outside" [ "a" ];
    }""")
    evaluation = completed(world.evaluate(jobset_id))
    builds = world.builds(evaluation.id)

    assert builds["a"].status is BuildStatus.failed
    assert builds["a"].error_message == "Dependency cycle: a <-> b"
    assert builds["b"].error_message == "Dependency cycle: a <-> b"
    # through a glob: star matches other, other matches star
    assert builds["star"].error_message == "Dependency cycle: other <-> star"
    assert builds["other"].error_message == "Dependency cycle: other <-> star"
    # an aggregate merely depending on a cycle waits for it (and will fail with it)
    assert builds["outside"].status is BuildStatus.pending
    assert builds["leaf"].status is BuildStatus.pending


def test_the_queue_runner_finishes_every_aggregate_of_a_cyclic_jobset(
        world: World, git_repo: Callable[..., GitRepo], nonce: str,
        driver: Callable[..., Driver]) -> None:  # noqa: F811
    jobset_id = _jobset(world, git_repo, nonce, """{
      leaf = mk "leaf" { };
      a = agg "a" [ "b" "leaf" ];
      b = agg "b" [ "a" ];
      outside = agg "outside" [ "a" "leaf" ];
      release = glob "release" [ "l*" ];
    }""")
    builds = world.builds(completed(world.evaluate(jobset_id)).id)
    ids = {name: build.id for name, build in builds.items()}
    # no hang: every build ends, the cycle's aggregates were never queued
    statuses = driver().run(list(ids.values()), timeout=60)
    assert statuses[ids["leaf"]] is BuildStatus.succeeded
    assert statuses[ids["release"]] is BuildStatus.succeeded
    assert statuses[ids["a"]] is statuses[ids["b"]] is BuildStatus.failed
    assert statuses[ids["outside"]] is BuildStatus.dependency_failed
    with world.factory() as session:
        rows = dict(session.execute(select(Build.job_name, Build.error_message).where(
            Build.id.in_(ids.values()))).tuples().all())
        stepped = session.scalars(select(Build.job_name).where(
            Build.id.in_(ids.values()), Build.stepped_at.is_not(None))).all()
    assert rows["a"] == "Dependency cycle: a <-> b"
    assert rows["outside"] == "constituents failed: a"
    assert sorted(stepped) == ["leaf", "outside", "release"]

    # restarting would build the aggregates and wait on the cycle again: refused
    with world.factory() as session, pytest.raises(Conflict) as refused:
        restart_build(session, ids["a"])
    assert str(refused.value) == (
        f"build {ids['a']} is an aggregate that failed at evaluation "
        "(Dependency cycle: a <-> b): fix the jobset and evaluate it again")
    with world.factory() as session, session.begin():
        assert restart_builds(session, [ids["a"], ids["b"], ids["leaf"]]) == [ids["leaf"]]


def test_jobs_sharing_a_derivation_link_the_lowest_job_name(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    jobset_id = _jobset(world, git_repo, nonce, """
    let shared = mk "shared" { }; in {
      zeta = shared;
      alpha = shared;
      mid = shared;
      release = agg "release" [ shared ];
    }""")
    evaluation = completed(world.evaluate(jobset_id))
    builds = world.builds(evaluation.id)
    assert len({builds[n].drv_path for n in ("zeta", "alpha", "mid")}) == 1
    assert _members(world, builds["release"]) == ["alpha"]


def test_aggregates_are_resolved_anew_in_every_evaluation(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    repo = git_repo()
    body = PRELUDE + """{ release = agg "release" [ "x" ]; %s }"""

    def commit(extra: str) -> None:
        text = (body % extra).replace("@SYSTEM@", current_system()).replace("@NONCE@", nonce)
        repo.commit({"release.nix": text})

    commit("")
    jobset_id = world.jobset(repo.url, flake=False, expression="release.nix")
    first = world.builds(completed(world.evaluate(jobset_id)).id)
    assert first["release"].error_message == "x: does not exist"
    # adding the job does not change the aggregate's derivation, but it now resolves
    commit('x = mk "x" { };')
    second = world.builds(completed(world.evaluate(jobset_id)).id)
    assert second["release"].drv_path == first["release"].drv_path
    assert second["release"].id != first["release"].id
    assert second["release"].status is BuildStatus.pending
    assert _members(world, second["release"]) == ["x"]
    # nothing changed: the same aggregate is reused, like every other job
    third = world.builds(completed(world.evaluate(jobset_id)).id)
    assert third["release"].id == second["release"].id
    assert third["x"].id == second["x"].id


@pytest.fixture
def replaying_nix_eval_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                            ) -> Callable[[list[dict[str, object]]], None]:
    """The nix-eval-jobs stand-in on PATH, replaying the given records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(RECORDING / "nix-eval-jobs", bin_dir / "nix-eval-jobs")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    output = tmp_path / "output.jsonl"

    def replay(records: list[dict[str, object]]) -> None:
        output.write_text("".join(json.dumps(r) + "\n" for r in records))
        (bin_dir / "fake.env").write_text(
            f"CIRCUS_FAKE_NEJ_ARGS='{tmp_path / 'args'}'\n"
            f"CIRCUS_FAKE_NEJ_OUTPUT='{output}'\n")

    return replay


def test_nix_eval_jobs_records_with_unresolved_globs_are_resolved(
        world: World, git_repo: Callable[..., GitRepo], nonce: str, tmp_path: Path,
        nix_env: dict[str, str],
        replaying_nix_eval_jobs: Callable[[list[dict[str, object]]], None]) -> None:
    # nix-eval-jobs versions that print namedConstituents/globConstituents unresolved
    body = """{
      packages.a = mk "a" { };
      release = glob "release" [ "packages.*" ];
      gated = glob "gated" [ "tests.*" ];
      shared = mk "shared" { };
      pinned = agg "pinned" [ (mk "shared" { }) ];
    }"""
    jobset_id = _jobset(world, git_repo, nonce, body)
    expr = tmp_path / "jobs.nix"
    expr.write_text((PRELUDE + body).replace("@SYSTEM@", current_system())
                    .replace("@NONCE@", nonce))

    def record(path: list[str], **extra: object) -> dict[str, object]:
        drv = subprocess.run(["nix-instantiate", str(expr), "-A", ".".join(path)],
                             env=nix_env, check=True, capture_output=True,
                             text=True).stdout.strip()
        out = subprocess.run(["nix-store", "-q", "--outputs", drv], env=nix_env,
                             check=True, capture_output=True, text=True).stdout.strip()
        return {"attr": ".".join(path), "attrPath": path, "drvPath": drv,
                "name": path[-1], "system": current_system(), "outputs": {"out": out},
                "meta": {}, **extra}

    shared = record(["shared"])
    # nix-eval-jobs' workers print in any order: two jobs with one derivation, the
    # higher name first; the aggregate's link must not depend on that order
    replaying_nix_eval_jobs([
        {**shared, "attr": "zeta", "attrPath": ["zeta"]},
        record(["pinned"], constituents=[shared["drvPath"]], namedConstituents=[]),
        {**shared, "attr": "alpha", "attrPath": ["alpha"]},
        record(["packages", "a"]),
        record(["release"], constituents=[], namedConstituents=["packages.*"],
               globConstituents=True),
        record(["gated"], constituents=[], namedConstituents=["tests.*"],
               globConstituents=True),
    ])
    evaluation = completed(world.evaluate(jobset_id))
    assert (tmp_path / "args").exists()  # the nix-eval-jobs path ran, not the walker
    builds = world.builds(evaluation.id)
    assert _members(world, builds["pinned"]) == ["alpha"]
    assert _members(world, builds["release"]) == ["packages.a"]
    assert builds["release"].status is BuildStatus.pending
    assert builds["gated"].status is BuildStatus.failed
    assert builds["gated"].error_message == "tests.*: constituent glob pattern had no matches"
