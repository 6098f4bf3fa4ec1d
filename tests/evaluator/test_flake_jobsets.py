"""Flake jobsets evaluated with the built-in evaluator against real git and Nix."""

from __future__ import annotations

import os
import select as select_module
from pathlib import Path

import psycopg2
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url

from circus.common.db import normalise_url
from circus.common.enums import BuildStatus, EvaluationStatus, TriggerKind
from circus.common.messaging import BUILDS_CHANNEL
from circus.common.models import BuildConstituent, BuildDependency, EvaluationBuild
from circus.common.nix.environment import current_system
from circus.evaluator.jobs import scan_derivation
from tests.evaluator.conftest import World, completed
from tests.helpers.gitrepo import GitRepo


def listen(engine: Engine) -> psycopg2.extensions.connection:
    url = make_url(normalise_url(str(engine.url.render_as_string(hide_password=False))))
    conn = psycopg2.connect(url.set(drivername="postgresql").render_as_string(
        hide_password=False))
    conn.autocommit = True
    conn.cursor().execute(f"LISTEN {BUILDS_CHANNEL}")
    return conn


def test_a_flake_jobset_becomes_builds(world: World, flake_repo: GitRepo,
                                       engine: Engine) -> None:
    jobset_id = world.jobset(flake_repo.url)
    listener = listen(engine)
    evaluation = completed(world.evaluate(jobset_id))

    assert evaluation.commit_hash == flake_repo.head()
    assert evaluation.trigger_kind is TriggerKind.manual
    assert evaluation.flake_ref is not None
    assert f"rev={flake_repo.head()}" in evaluation.flake_ref
    assert evaluation.inputs["repository"]["revision"] == flake_repo.head()
    assert len(evaluation.inputs_hash or "") == 64
    assert evaluation.eval_time is not None
    assert evaluation.eval_time > 0
    assert evaluation.attrs_total == evaluation.attrs_done == 8
    assert evaluation.builds_new == 8
    assert evaluation.errors == []

    builds = world.builds(evaluation.id)
    assert set(builds) == {"hello", "nested.plain", "nested.kvm", 'nested."dotted.name"',
                           "nested.deeper.leaf", "usesHello", "fetched", "release"}

    hello = builds["hello"]
    assert hello.status is BuildStatus.pending
    assert hello.stepped_at is None
    assert hello.evaluation_id == evaluation.id
    assert hello.system == current_system()
    assert hello.nix_name == "hello"
    assert hello.drv_path.endswith("-hello.drv")
    assert Path(hello.drv_path).exists()
    assert hello.output_map["out"].endswith("-hello")
    assert hello.meta_description == "Says hello"
    assert hello.meta_license == "MIT"
    assert hello.meta_homepage == "https://example.org/hello"
    assert hello.meta_maintainers == "Alice, bob"
    assert (hello.timeout, hello.max_silent, hello.priority) == (600, 60, 50)
    assert hello.repeats == 1
    assert hello.outputs_to_install == ["out"]
    assert hello.max_retries == world.settings.queue_runner.max_retries
    assert not hello.is_fod
    assert not hello.is_aggregate

    plain = builds["nested.plain"]
    assert (plain.priority, plain.timeout, plain.max_silent, plain.repeats) == (0, None, None, 0)
    assert plain.meta_description is None
    assert plain.outputs_to_install is None
    assert sorted(builds["nested.kvm"].required_features) == ["big-parallel", "kvm"]
    assert builds["nested.plain"].required_features == []
    assert builds["fetched"].is_fod
    assert builds['nested."dotted.name"'].nix_name == "dotted"

    with world.factory() as session:
        members = session.execute(select(EvaluationBuild.build_id, EvaluationBuild.is_new)
                                  .where(EvaluationBuild.evaluation_id == evaluation.id)).all()
        constituents = session.scalars(select(BuildConstituent.constituent_id).where(
            BuildConstituent.aggregate_id == builds["release"].id)).all()
        dependencies = session.execute(select(BuildDependency.build_id,
                                              BuildDependency.dependency_id)).all()
    assert sorted(members) == sorted((b.id, True) for b in builds.values())
    assert builds["release"].is_aggregate
    assert sorted(constituents) == sorted([hello.id, plain.id])
    # direct input derivations that are jobs of the same evaluation
    assert sorted(dependencies) == sorted([(builds["usesHello"].id, hello.id),
                                           (builds["release"].id, hello.id)])

    # the queue runner is told on commit
    ready = select_module.select([listener], [], [], 5)
    assert ready[0], "no NOTIFY arrived"
    listener.poll()
    assert [n.payload for n in listener.notifies] == [str(evaluation.id)]
    listener.close()

    # one GC root keeps every .drv alive until it is built
    root = Path(world.settings.evaluator.work_dir) / "gcroots" / f"eval-{evaluation.id}" / "roots"
    assert root.is_symlink()
    listed = Path(os.readlink(root)).read_text().split()
    assert sorted(listed) == sorted(b.drv_path for b in builds.values())

    jobset = world.jobset_row(jobset_id)
    assert jobset.last_check_outcome == "evaluated"
    assert jobset.last_checked_at is not None
    assert jobset.error_message is None


def test_drv_scanner_reads_what_the_importer_needs(world: World, flake_repo: GitRepo) -> None:
    evaluation = completed(world.evaluate(world.jobset(flake_repo.url)))
    builds = world.builds(evaluation.id)
    facts = scan_derivation(Path(builds["usesHello"].drv_path).read_text())
    assert facts.input_drvs == [builds["hello"].drv_path]
    assert not facts.is_fod
    assert scan_derivation(Path(builds["fetched"].drv_path).read_text()).is_fod
    kvm = scan_derivation(Path(builds["nested.kvm"].drv_path).read_text())
    assert kvm.required_features == ["kvm", "big-parallel"]
    assert scan_derivation(Path(builds["release"].drv_path).read_text()).is_aggregate


def test_checks_are_the_default_when_a_flake_has_no_hydra_jobs(
        world: World, git_repo: type[GitRepo], nonce: str) -> None:
    repo = git_repo("checks")
    repo.commit({"flake.nix": f"""{{
  outputs = {{ self }}: {{
    checks.{current_system()}.unit = derivation {{
      name = "unit"; system = "{current_system()}"; builder = "/bin/sh";
      args = [ "-c" "echo {nonce} > $out" ];
    }};
  }};
}}"""})
    evaluation = completed(world.evaluate(world.jobset(repo.url)))
    assert set(world.builds(evaluation.id)) == {f"{current_system()}.unit"}
    assert evaluation.status is EvaluationStatus.completed
