"""The nix-eval-jobs path, with a stand-in on PATH replaying recorded output."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus, InputType
from circus.evaluator import execution
from tests.conftest import FIXTURES
from tests.evaluator.conftest import World, completed
from tests.helpers.gitrepo import GitRepo

RECORDING = FIXTURES / "nix" / "nix-eval-jobs"


@pytest.fixture
def fake_nix_eval_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       nix_env: dict[str, str]) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(RECORDING / "nix-eval-jobs", bin_dir / "nix-eval-jobs")
    args = tmp_path / "nix-eval-jobs.args"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    # read by the stand-in from its own directory (evaluation scrubs the environment)
    (bin_dir / "fake.env").write_text(
        f"CIRCUS_FAKE_NEJ_ARGS='{args}'\n"
        f"CIRCUS_FAKE_NEJ_OUTPUT='{RECORDING / 'hydra-jobs.jsonl'}'\n")
    # the recorded .drv paths must exist, as they did when the output was recorded
    subprocess.run(["nix-instantiate", str(RECORDING / "jobs.nix"), "-A", "hello",
                    "-A", "nested.kvm", "-A", '"nested"."dotted.attr"', "-A", "tarball",
                    "-A", "all"], env=nix_env, check=True, capture_output=True)
    return args


@pytest.fixture
def recorded_repo(git_repo: Callable[..., GitRepo]) -> GitRepo:
    repo = git_repo("recorded")
    repo.commit({name: (RECORDING / name).read_text() for name in ("flake.nix", "jobs.nix")})
    return repo


def test_nix_eval_jobs_output_becomes_builds(world: World, recorded_repo: GitRepo,
                                             fake_nix_eval_jobs: Path) -> None:
    evaluation = completed(world.evaluate(world.jobset(recorded_repo.url)))

    argv = fake_nix_eval_jobs.read_text().splitlines()
    settings = world.settings.evaluator
    roots = str(execution.gc_roots_dir(world.settings, evaluation.id))
    assert argv[:2] == ["--gc-roots-dir", roots]
    assert argv[argv.index("--workers") + 1] == str(settings.workers)
    assert argv[argv.index("--max-memory-size") + 1] == str(settings.max_memory_size)
    for flag in ("--meta", "--constituents", "--force-recurse"):
        assert flag in argv
    flake = argv[argv.index("--flake") + 1]
    assert flake.endswith(f"&rev={recorded_repo.head()}#hydraJobs")
    assert argv[argv.index("allow-import-from-derivation") + 1] == "false"

    builds = world.builds(evaluation.id)
    assert set(builds) == {"hello", "nested.kvm", 'nested."dotted.attr"', "tarball", "all"}
    assert {e.job_name: e.message for e in evaluation.errors} == {
        "broken": "error: this job is broken"}
    hello = builds["hello"]
    assert hello.output_map == {"out": "/nix/store/9wwm9cp1inwpx47kcmzfwl41ik5j51j1-hello"}
    assert (hello.meta_license, hello.meta_homepage, hello.meta_maintainers) == (
        "GPL-3.0-or-later", "https://example.org/hello", "Alice")
    assert (hello.timeout, hello.max_silent, hello.priority) == (1200, 300, 10)
    # facts nix-eval-jobs does not print come from the .drv files
    assert builds["nested.kvm"].required_features == ["kvm"]
    assert builds["tarball"].is_fod
    assert builds["all"].is_aggregate
    assert not hello.is_aggregate
    assert Path(roots, Path(hello.drv_path).name).is_symlink()


def test_classic_jobsets_get_their_arguments_on_the_command_line(
        world: World, recorded_repo: GitRepo, fake_nix_eval_jobs: Path) -> None:
    jobset_id = world.jobset(recorded_repo.url, flake=False, expression="jobs.nix",
                             inputs=[("greeting", InputType.string, "hi there"),
                                     ("enable", InputType.boolean, "false")])
    evaluation = completed(world.evaluate(jobset_id))
    argv = fake_nix_eval_jobs.read_text().splitlines()
    assert "--flake" not in argv
    at = argv.index("--argstr")
    assert argv[at:at + 3] == ["--argstr", "greeting", "hi there"]
    at = argv.index("--arg")
    assert argv[at:at + 3] == ["--arg", "enable", "false"]
    source = evaluation.inputs["repository"]["store_path"]
    assert f"{source}/jobs.nix" in argv
    assert len(world.builds(evaluation.id)) == 5


def test_a_hanging_nix_eval_jobs_is_killed_with_its_children(
        world: World, recorded_repo: GitRepo, fake_nix_eval_jobs: Path,
        monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings]) -> None:
    marker = f"1000.{random.randrange(10**6):06d}"
    with (fake_nix_eval_jobs.parent / "bin" / "fake.env").open("a") as env:
        env.write(f"CIRCUS_FAKE_NEJ_HANG='{marker}'\n")
    evaluation_id = world.trigger(world.jobset(recorded_repo.url))
    settings = make_settings(evaluator={"nix_timeout": 3})
    assert world.run(evaluation_id, settings).status == "timed_out"
    assert fake_nix_eval_jobs.exists()  # the stand-in did start (and then hung)
    assert world.evaluation(evaluation_id).status is EvaluationStatus.timed_out
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and marker.encode() in _cmdline(p)]
    assert leftovers == []


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


VERSIONS = RECORDING / "versions"
#: releases whose nix-eval-jobs has no --constituents (their aggregates' constituents are
#: read from the .drv files)
WITHOUT_CONSTITUENTS = {"2.8", "2.12", "2.24"}


@pytest.mark.parametrize("version", sorted(p.stem for p in VERSIONS.glob("*.jsonl")))
def test_every_nix_eval_jobs_version_records_the_same_evaluation(
        world: World, recorded_repo: GitRepo, fake_nix_eval_jobs: Path, nix_env: dict[str, str],
        version: str) -> None:
    """Each release's output shape (see versions/README.md) gives the same builds, errors
    and aggregate constituents."""
    subprocess.run(["nix-instantiate", str(VERSIONS / "jobs.nix"), "-A", "all", "-A", "release",
                    "-A", "gate", "-A", "rewritten"], env=nix_env, check=True,
                   capture_output=True)
    with (fake_nix_eval_jobs.parent / "bin" / "fake.env").open("a") as env:
        env.write(f"CIRCUS_FAKE_NEJ_OUTPUT='{VERSIONS / f'{version}.jsonl'}'\n")
        if version in WITHOUT_CONSTITUENTS:
            env.write("CIRCUS_FAKE_NEJ_NEW_FLAGS=''\n")
    evaluation = completed(world.evaluate(world.jobset(recorded_repo.url)))

    argv = fake_nix_eval_jobs.read_text().splitlines()
    # an option the release does not know would fail the whole run
    assert ("--constituents" in argv) is (version not in WITHOUT_CONSTITUENTS)
    builds = world.builds(evaluation.id)
    # before attrPath (2.8) a dotted attribute name could not be evaluated at all
    dotted = set() if version == "2.8" else {'nested."dotted.attr"'}
    assert set(builds) == {"hello", "nested.kvm", "tarball", "all", "release", "gate"} | dotted
    assert {e.job_name: e.message for e in evaluation.errors} == {
        "broken": "error: this job is broken"}
    assert builds["hello"].meta_license == "GPL-3.0-or-later"
    assert builds["nested.kvm"].required_features == ["kvm"]
    assert builds["tarball"].is_fod
    assert {n for n, b in builds.items() if b.is_aggregate} == {"all", "release", "gate"}
    members = _constituents(world, evaluation.id)
    assert members["all"] == members["release"] == ["hello", "nested.kvm"]
    for name in ("all", "release"):
        assert builds[name].status is BuildStatus.pending
    gate = builds["gate"]
    assert gate.status is BuildStatus.failed
    assert sorted((gate.error_message or "").splitlines()) == [
        "broken: error: this job is broken", "missing: does not exist"]


def _constituents(world: World, evaluation_id: int) -> dict[str, list[str]]:
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from circus.common.models import Build, BuildConstituent

    member = aliased(Build)
    with world.factory() as session:
        rows = session.execute(
            select(Build.job_name, member.job_name)
            .join(BuildConstituent, BuildConstituent.aggregate_id == Build.id)
            .join(member, member.id == BuildConstituent.constituent_id)
            .where(Build.evaluation_id == evaluation_id)).all()
    found: dict[str, list[str]] = {}
    for aggregate, name in rows:
        found.setdefault(aggregate, []).append(name)
    return {k: sorted(v) for k, v in found.items()}
