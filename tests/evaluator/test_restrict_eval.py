"""evaluator.restrict_eval and allow_ifd reach Nix."""

from __future__ import annotations

from collections.abc import Callable

from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, InputType
from tests.evaluator.conftest import World, completed, fixture_text
from tests.helpers.gitrepo import GitRepo


def test_restricted_evaluation_still_evaluates_flakes_and_classic_jobsets(
        world: World, flake_repo: GitRepo, git_repo: Callable[..., GitRepo], nonce: str,
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(evaluator={"restrict_eval": True})
    completed(world.evaluate(world.jobset(flake_repo.url), settings))
    src = git_repo("src")
    src.commit({"release.nix": fixture_text("release-classic.nix", nonce),
                "nonce.txt": nonce})
    lib = git_repo("lib")
    lib.commit({"value.txt": "v"})
    classic = world.jobset(src.url, flake=False, expression="release.nix",
                           inputs=[("src", InputType.git, src.url),
                                   ("lib", InputType.git, lib.url),
                                   ("greeting", InputType.string, "x"),
                                   ("enable", InputType.boolean, "true")])
    completed(world.evaluate(classic, settings))


def test_restricted_evaluation_refuses_paths_outside_the_inputs(
        world: World, git_repo: Callable[..., GitRepo],
        make_settings: Callable[..., Settings]) -> None:
    repo = git_repo("escape")
    repo.commit({"release.nix": '{ }: { x = builtins.readFile "/etc/hostname"; }'})
    jobset_id = world.jobset(repo.url, flake=False, expression="release.nix")
    restricted = world.evaluate(jobset_id, make_settings(evaluator={"restrict_eval": True}))
    assert restricted.status is EvaluationStatus.completed
    assert restricted.errors
    assert "restricted mode" in restricted.errors[0].message


def test_import_from_derivation_is_refused_unless_allowed(
        world: World, git_repo: Callable[..., GitRepo], nonce: str,
        make_settings: Callable[..., Settings]) -> None:
    repo = git_repo("ifd")
    repo.commit({"release.nix": f"""{{ }}:
let gen = derivation {{
  name = "gen"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo '{{ value = \\"{nonce}\\"; }}' > $out" ];
}}; in {{
  x = derivation {{ name = "ifd-" + (import gen).value; system = builtins.currentSystem;
                   builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }};
}}"""})
    jobset_id = world.jobset(repo.url, flake=False, expression="release.nix")
    refused = completed(world.evaluate(jobset_id))
    assert [e.job_name for e in refused.errors] == ["x"]
    assert "import" in refused.errors[0].message
    allowed = completed(world.evaluate(jobset_id, make_settings(evaluator={"allow_ifd": True})))
    assert allowed.errors == []
    assert set(world.builds(allowed.id)) == {"x"}
