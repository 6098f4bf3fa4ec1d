"""Broken jobs, broken expressions and bad jobset settings: readable errors, nothing lost."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, InputType
from circus.evaluator import execution
from tests.evaluator.conftest import World, completed, fixture_text
from tests.helpers.gitrepo import GitRepo
from tests.helpers.net import free_port


def test_failing_jobs_are_recorded_and_their_siblings_become_builds(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    repo = git_repo("errors")
    repo.commit({"flake.nix": fixture_text("flake-errors.nix", nonce)})
    evaluation = completed(world.evaluate(world.jobset(repo.url)))

    assert set(world.builds(evaluation.id)) == {"good", "group.fine", "later"}
    errors = {e.job_name: e.message for e in evaluation.errors}
    assert set(errors) == {"thrower", "asserted", "missing", "group.typo", "group.aborted"}
    assert "this job is deliberately broken" in errors["thrower"]
    assert "assertion" in errors["asserted"]
    assert "attribute 'doesNotExist' missing" in errors["missing"]
    assert "cannot add" in errors["group.typo"]
    assert "aborting on purpose" in errors["group.aborted"]
    assert evaluation.attrs_total == 8
    assert evaluation.builds_new == 3


def test_a_syntax_error_fails_the_evaluation_with_its_text(
        world: World, flake_repo: GitRepo) -> None:
    flake_repo.commit({"flake.nix": "{ outputs = { self }: { hydraJobs = { a = ; }; }; }"})
    jobset_id = world.jobset(flake_repo.url)
    evaluation = world.evaluate(jobset_id)
    assert evaluation.status is EvaluationStatus.failed
    assert "syntax error" in (evaluation.error_message or "")
    assert "flake.nix" in (evaluation.error_message or "")
    assert evaluation.stderr_tail
    assert evaluation.finished_at is not None
    assert world.builds(evaluation.id) == {}
    jobset = world.jobset_row(jobset_id)
    assert jobset.last_check_outcome == "error"
    # an evaluation error is not a fetch error: the jobset's error stays clear
    assert jobset.error_message is None


def test_a_non_existent_branch_is_a_readable_fetch_error(world: World,
                                                         flake_repo: GitRepo) -> None:
    jobset_id = world.jobset(flake_repo.url, branch="no-such-branch")
    assert world.check(jobset_id) == "error"
    jobset = world.jobset_row(jobset_id)
    assert jobset.error_message == (f"branch 'no-such-branch' does not exist in "
                                    f"{flake_repo.url}")
    assert jobset.error_at is not None
    assert world.count_evaluations(jobset_id) == 0
    # a manual trigger fails its evaluation with the same message
    evaluation = world.evaluate(jobset_id)
    assert evaluation.status is EvaluationStatus.failed
    assert evaluation.error_message == jobset.error_message


def test_an_unreachable_repository_records_a_fetch_error_until_it_works(
        world: World, flake_repo: GitRepo, tmp_path: Path) -> None:
    gone = tmp_path / "moved-away"
    jobset_id = world.jobset(f"file://{gone}")
    assert world.check(jobset_id) == "error"
    jobset = world.jobset_row(jobset_id)
    assert jobset.error_message is not None
    assert "fetching file://" in jobset.error_message
    assert world.count_evaluations(jobset_id) == 0
    # the repository appears: the next check evaluates and clears the error
    flake_repo.path.rename(gone)
    assert world.check(jobset_id) == "evaluated"
    jobset = world.jobset_row(jobset_id)
    assert jobset.error_message is None
    assert jobset.error_at is None


def test_network_failures_are_fetch_errors(world: World,
                                            make_settings: Callable[..., Settings]) -> None:
    # loopback stands in for a git server on the network: the admin allow-lists it
    loopback = {"outbound_allowlist": ["127.0.0.1"]}
    world.settings = make_settings(server=loopback, evaluator={"git_timeout": 30})
    refused = world.jobset(f"http://127.0.0.1:{free_port()}/repo.git")
    assert world.check(refused) == "error"
    assert "Failed to connect" in (world.jobset_row(refused).error_message or "")
    # a server that accepts and never answers: git_timeout applies
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        silent = world.jobset(f"http://127.0.0.1:{port}/repo.git")
        world.settings = make_settings(server=loopback, evaluator={"git_timeout": 2})
        started = time.monotonic()
        assert world.check(silent) == "error"
        assert time.monotonic() - started < 20
    message = world.jobset_row(silent).error_message or ""
    assert "timed out after 2 s (evaluator.git_timeout)" in message


def test_a_url_scheme_outside_the_allowed_ones_is_rejected(world: World) -> None:
    jobset_id = world.jobset("ext::sh -c touch% /tmp/pwned")
    assert world.check(jobset_id) == "error"
    message = world.jobset_row(jobset_id).error_message or ""
    assert "scheme 'ext'" in message
    assert "not allowed" in message


def test_a_repository_without_flake_nix_in_flake_mode(world: World,
                                                       git_repo: Callable[..., GitRepo]
                                                       ) -> None:
    repo = git_repo("plain")
    repo.commit({"default.nix": "{ }"})
    evaluation = world.evaluate(world.jobset(repo.url))
    assert evaluation.status is EvaluationStatus.failed
    assert "has no flake.nix" in (evaluation.error_message or "")
    assert "flake mode" in (evaluation.error_message or "")


def test_an_attribute_that_is_not_an_attribute_set(world: World, flake_repo: GitRepo) -> None:
    evaluation = world.evaluate(world.jobset(flake_repo.url, expression="hydraJobs.version"))
    assert evaluation.status is EvaluationStatus.failed
    assert "'hydraJobs.version' is a string, not an attribute set of jobs" in (
        evaluation.error_message or "")
    missing = world.evaluate(world.jobset(flake_repo.url, expression="packages.nothing"))
    assert missing.status is EvaluationStatus.failed
    assert "does not provide attribute 'packages.nothing'" in (missing.error_message or "")


def test_the_evaluator_keeps_going_after_bad_input(world: World, flake_repo: GitRepo) -> None:
    bad = world.jobset(flake_repo.url, expression="hydraJobs.version")
    assert world.evaluate(bad).status is EvaluationStatus.failed
    good = world.jobset(flake_repo.url)
    completed(world.evaluate(good))


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def test_a_hanging_evaluation_times_out_and_leaves_no_process(
        world: World, make_settings: Callable[..., Settings], git_repo: Callable[..., GitRepo],
        tmp_path: Path) -> None:
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    repo = git_repo("hang")
    repo.commit({"release.nix": "{ path }: { x = builtins.readFile path; }"})
    jobset_id = world.jobset(repo.url, flake=False, expression="release.nix",
                             inputs=[("path", InputType.string, str(fifo))])
    # reading a server file (the FIFO) needs restrict_eval off
    settings = make_settings(evaluator={"nix_timeout": 2, "restrict_eval": False})
    started = time.monotonic()
    evaluation_id = world.trigger(jobset_id)
    outcome = world.run(evaluation_id, settings)
    assert outcome.status == "timed_out"
    assert time.monotonic() - started < 30
    evaluation = world.evaluation(evaluation_id)
    assert evaluation.status is EvaluationStatus.timed_out
    assert "evaluator.nix_timeout (2 s)" in (evaluation.error_message or "")
    assert _processes_mentioning(str(execution.run_dir(settings, evaluation_id))) == []
