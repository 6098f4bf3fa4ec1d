"""An evaluator on another host: ``circus-evaluator --no-beat`` with its own Nix store
evaluates a jobset, uploads the new builds' .drv closure to a real circus-server before
it commits them, and the main host's queue runner builds them; with a second evaluator
(beat included) on the main store, no evaluation runs twice. And the upload endpoint's
refusals, tried against a running server."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.nix.environment import current_system
from tests.agents.conftest import store_has
from tests.agents.test_integration import valid_here, wait_builds
from tests.evaluator.conftest import World
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.helpers.gitrepo import GitRepo
from tests.helpers.net import wait_for_port
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.daemons import runner_daemon, server_daemon
from tests.workers.support import exported_in_private_store

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "evaluator-token-" + "e" * 40
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()

pytestmark = pytest.mark.slow

#: top's .drv names a source of the flake (data.txt) and dep's .drv: both have to travel
FLAKE = """{
  outputs = { self }:
    let
      mk = name: extra: derivation ({
        inherit name; system = "@SYSTEM@"; builder = "/bin/sh";
      } // extra);
      dep = mk "dep-@NONCE@" { args = [ "-c" "echo dep @NONCE@ > $out" ]; };
    in {
      hydraJobs = {
        inherit dep;
        top = mk "top-@NONCE@" {
          data = ./data.txt;
          # no coreutils in the sandbox: the shell's read
          args = [ "-c" "read a < $data; read b < ${dep}; echo $a > $out; echo $b >> $out" ];
        };
      };
    };
}
"""


def flake(nonce: str) -> str:
    return FLAKE.replace("@SYSTEM@", current_system()).replace("@NONCE@", nonce)


@contextmanager
def server_and_runner(runner_config: Callable[..., dict[str, Any]],  # noqa: F811
                      tmp_path: Path, workers: int = 2) -> Iterator[tuple[str, Daemon]]:
    """A circus-server whose /api/v1/workers accepts TOKEN and, unless ``workers`` is 0,
    a queue runner building on this host's store; yields the server's URL and daemon."""
    config = runner_config(
        remote_workers={"auth_tokens": [DIGEST]},
        server={"secret_key": "s" * 40, "workers": 2, "rate_limit_storage": "memory://",
                "require_api_key_for_reads": False})
    server, port = server_daemon(config, tmp_path)
    with server:
        if workers:
            runner = runner_daemon("qr-local", config, tmp_path, workers=workers)
            runner.__enter__()
        try:
            wait_for_port(port, timeout=60)
            yield f"http://127.0.0.1:{port}", server
        finally:
            if workers:
                runner.__exit__(None, None, None)
            print(server.log()[-3000:])


def evaluator_config(world: World, directory: Path, extra: str = "") -> Path:
    path = directory / "circus.toml"
    path.write_text(f"""
[database]
url = "{world.settings.database.url}"
[broker]
url = "{world.settings.broker.url}"
[nix]
substituters = []
[evaluator]
work_dir = "{directory / 'work'}"
poll_interval = 1
max_concurrent_evals = 2
{extra}
[tracing]
level = "info"
""")
    return path


def evaluator_in_own_store(world: World, directory: Path, server_url: str) -> Daemon:
    """``circus-evaluator --no-beat`` whose /nix is a private bind mount (another host's
    store), reaching PostgreSQL and the broker over TCP."""
    (directory / "nix").mkdir(parents=True, exist_ok=True)
    config = evaluator_config(world, directory, f"""
upload_derivations_to = "{server_url}"
upload_token = "{TOKEN}"
upload_name = "eval2"
""")
    inner = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "circus.evaluator.main",
                                              "--no-beat"])
    script = f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && exec {inner}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env.update(PYTHONPATH=str(ROOT), CIRCUS_CONFIG_FILE=str(config))
    return Daemon("evaluator-remote", ["unshare", "--mount", "--propagation", "private",
                                       "sh", "-c", script], directory / "logs", env=env,
                  cwd=directory)


def evaluator_here(world: World, directory: Path, nix_env: dict[str, str]) -> Daemon:
    """An evaluator with beat on this host's store (no upload)."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {**nix_env, "PYTHONPATH": str(ROOT),
           "CIRCUS_CONFIG_FILE": str(evaluator_config(world, directory))}
    return Daemon("evaluator-local", [circus_command("circus-evaluator")], directory / "logs",
                  env=env, cwd=directory)


def evaluated_ids(log: str) -> list[int]:
    """Evaluations an evaluator ran to a commit (its "evaluation N: ... new builds" line)."""
    return [int(n) for n in re.findall(r"evaluation (\d+): \d+ new builds", log)]


def test_an_evaluator_with_its_own_store_uploads_derivations_the_main_host_builds(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        world: World, git_repo: Callable[..., GitRepo], nonce: str, tmp_path: Path,
        nix_env: dict[str, str]) -> None:
    repo = git_repo("remote-eval")
    repo.commit({"flake.nix": flake(nonce), "data.txt": f"data {nonce}\n"}, "initial")
    jobset_id = world.jobset(repo.url)
    remote_dir = tmp_path / "remote"
    with server_and_runner(runner_config, tmp_path) as (server, server_daemon), \
            evaluator_in_own_store(world, remote_dir, server) as remote:
        wait_until(lambda: " ready." in remote.log() or not remote.alive(), timeout=60,
                   message="the remote evaluator consuming")
        assert remote.alive(), remote.log()
        # only the remote evaluator consumes the eval queue: it takes this evaluation
        first = world.trigger(jobset_id)
        try:
            wait_until(lambda: world.evaluation(first).status.is_finished, timeout=180,
                       message="the remote evaluation")
        finally:
            print(remote.log()[-6000:])
        evaluation = world.evaluation(first)
        assert evaluation.status is EvaluationStatus.completed, (
            evaluation.error_message, remote.log()[-4000:])
        builds = world.builds(first)
        assert sorted(builds) == ["dep", "top"]
        result = wait_builds(world.factory, [b.id for b in builds.values()], timeout=180)
        assert set(result.values()) == {BuildStatus.succeeded}, (result, server_daemon.log())
        drvs = [b.drv_path for b in builds.values()]
        # Nix wrote the .drv files in the remote store; the upload put them (and the
        # flake's data.txt that top's .drv names) into this host's store
        assert all(store_has(remote_dir, d) for d in drvs)
        assert all(valid_here(d) for d in drvs)
        top_output = builds["top"].outputs[0].path
        assert Path(top_output).read_text() == f"data {nonce}\ndep {nonce}\n"
        assert "uploaded 3 of the 3 path(s) of the .drv closure of 2 build(s)" in remote.log()

        # a second evaluator, with beat, on this host's store: every evaluation from now
        # on is run by exactly one of the two, whichever the broker hands it to first
        with evaluator_here(world, tmp_path / "local", nix_env) as local:
            wait_until(lambda: " ready." in local.log() or not local.alive(), timeout=60,
                       message="the local evaluator consuming")
            assert local.alive(), local.log()
            others = []
            for index in range(4):
                other_repo = git_repo(f"remote-eval-{index}")
                other_repo.commit({"flake.nix": flake(f"{nonce}-{index}"),
                                   "data.txt": f"data {index}\n"}, "initial")
                others.append(world.jobset(other_repo.url))
            triggered = [world.trigger(j) for j in others]
            wait_until(lambda: all(world.evaluation(e).status.is_finished for e in triggered),
                       timeout=240, message="the evaluations of both evaluators")
            statuses = {e: world.evaluation(e).status for e in triggered}
            # whichever evaluator ran it, every new build's .drv is in this host's store
            later_drvs = [b.drv_path for e in triggered for b in world.builds(e).values()]
            local_log, remote_log = local.log(), remote.log()
    assert set(statuses.values()) == {EvaluationStatus.completed}, (
        statuses, local_log[-3000:], remote_log[-3000:])
    assert len(later_drvs) == 2 * len(triggered)
    assert all(valid_here(d) for d in later_drvs)
    runs = Counter(evaluated_ids(local_log) + evaluated_ids(remote_log))
    # beat's own scheduled checks may add evaluations; none ran twice
    assert all(runs[e] == 1 for e in triggered), runs
    assert max(runs.values()) == 1, runs
    assert runs[first] == 1


def test_the_derivation_upload_refuses_a_wrong_token_and_a_path_no_drv_names(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        tmp_path: Path, committed_db: sessionmaker[Session]) -> None:
    foreign, stream = exported_in_private_store(tmp_path / "other", "not a derivation\n")
    with server_and_runner(runner_config, tmp_path, workers=0) as (server, server_daemon):

        def upload(token: str, body: bytes) -> requests.Response:
            return requests.put(f"{server}/api/v1/workers/derivations", data=body,
                                headers={"Authorization": f"Bearer {token}",
                                         "X-Circus-Worker": "eval2",
                                         "Content-Type": "application/octet-stream"},
                                timeout=60)

        wrong = upload("x" * 56, stream)
        stray = upload(TOKEN, stream)
        garbage = upload(TOKEN, b"\x01" + b"\0" * 100)
        missing = requests.post(
            f"{server}/api/v1/workers/derivations/missing",
            json={"paths": [foreign, "/etc/passwd"]},
            headers={"Authorization": f"Bearer {TOKEN}", "X-Circus-Worker": "eval2"},
            timeout=60)
        asked = requests.post(
            f"{server}/api/v1/workers/derivations/missing", json={"paths": [foreign]},
            headers={"Authorization": f"Bearer {TOKEN}", "X-Circus-Worker": "eval2"},
            timeout=60)
        server_log = server_daemon.log()
    assert wrong.status_code == 401, wrong.text
    assert stray.status_code == 403, stray.text
    assert "neither a derivation nor a source" in stray.json()["error"]
    assert garbage.status_code == 403, garbage.text
    assert "not a valid export" in garbage.json()["error"]
    assert missing.status_code == 400, missing.text
    assert asked.status_code == 200, asked.text
    assert asked.json() == {"missing": [foreign]}
    # nothing of the refused stream reached the store
    assert not valid_here(foreign)
    assert "Traceback" not in server_log
