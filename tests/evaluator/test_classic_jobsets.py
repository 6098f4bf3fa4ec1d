"""Classic (non-flake) jobsets: Hydra-style inputs passed as function arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from circus.common.enums import EvaluationStatus, InputType
from circus.evaluator.jobs import scan_derivation
from tests.evaluator.conftest import World, completed, fixture_text
from tests.helpers.gitrepo import GitRepo


def _env(drv_path: str) -> str:
    return Path(drv_path).read_text()


def test_a_classic_jobset_gets_string_boolean_and_git_inputs(
        world: World, git_repo: Callable[..., GitRepo], nonce: str) -> None:
    src = git_repo("src")
    src.commit({"release.nix": fixture_text("release-classic.nix", nonce),
                "nonce.txt": nonce})
    src.commit({"README": "second commit"})
    lib = git_repo("lib", branch="stable")
    lib.commit({"value.txt": "library-value"})
    jobset_id = world.jobset(
        flake=False, expression="release.nix", expression_input="src", branch=None,
        inputs=[("src", InputType.git, f"{src.url} main"),
                ("lib", InputType.git, f"{lib.url} stable"),
                ("greeting", InputType.string, "bonjour"),
                ("enable", InputType.boolean, "true")])
    evaluation = completed(world.evaluate(jobset_id))

    builds = world.builds(evaluation.id)
    assert set(builds) == {"greet-bonjour", "tools.always", "optional"}
    drv = _env(builds["greet-bonjour"].drv_path)
    assert f'("srcRev","{src.head()}")' in drv
    assert f'("srcShortRev","{src.head()[:7]}")' in drv
    assert '("srcRevCount","2")' in drv
    assert '("libValue","library-value")' in drv
    assert f'("libRev","{lib.head()}")' in drv
    assert evaluation.commit_hash == src.head()
    assert evaluation.inputs["lib"]["revision"] == lib.head()
    assert evaluation.inputs["greeting"] == {"type": "string", "value": "bonjour"}
    assert evaluation.inputs["src"]["store_path"].startswith("/nix/store/")
    assert scan_derivation(drv).input_drvs == []


def test_inputs_change_the_jobs(world: World, git_repo: Callable[..., GitRepo],
                                nonce: str) -> None:
    src = git_repo("src")
    src.commit({"release.nix": fixture_text("release-classic.nix", nonce),
                "nonce.txt": nonce})
    lib = git_repo("lib")
    lib.commit({"value.txt": "v"})
    jobset_id = world.jobset(
        src.url, flake=False, expression="release.nix",
        inputs=[("src", InputType.git, src.url), ("lib", InputType.git, lib.url),
                ("greeting", InputType.string, "hi"),
                ("enable", InputType.boolean, "false")])
    evaluation = completed(world.evaluate(jobset_id))
    # the project's repository holds the expression when no input is named
    assert set(world.builds(evaluation.id)) == {"greet-hi", "tools.always"}
    assert evaluation.inputs["repository"]["revision"] == src.head()


def test_bad_classic_settings_are_readable(world: World, git_repo: Callable[..., GitRepo]
                                          ) -> None:
    src = git_repo("src")
    src.commit({"release.nix": "{ }"})
    missing_file = world.evaluate(world.jobset(src.url, flake=False, expression="nope.nix"))
    assert missing_file.status is EvaluationStatus.failed
    assert "file 'nope.nix' does not exist in the project's repository" in (
        missing_file.error_message or "")
    bad_bool = world.jobset(src.url, flake=False, expression="release.nix",
                            inputs=[("flag", InputType.boolean, "maybe")])
    assert world.check(bad_bool) == "error"
    assert "a boolean is true or false" in (world.jobset_row(bad_bool).error_message or "")
