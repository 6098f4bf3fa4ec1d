"""An evaluator on another host: ``circus-evaluator --no-beat`` with its own Nix store
evaluates a jobset, uploads the new builds' .drv closure to a real circus-server before
it commits them, and the main host's queue runner builds them; with a second evaluator
(beat included) on the main store, no evaluation runs twice. And the upload endpoint's
refusals (a forged .drv under another's path, references its content does not name, a
path no .drv names...), tried against a running server, and the GC roots of what it
takes."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.models import Evaluation
from circus.common.nix import storepath
from circus.common.nix.environment import current_system
from circus.evaluator.schedule import prune_gc_roots
from tests.agents.conftest import store_has
from tests.agents.test_integration import valid_here, wait_builds
from tests.evaluator.conftest import World
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.helpers.gitrepo import GitRepo
from tests.helpers.net import wait_for_port
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.daemons import runner_daemon, server_daemon
from tests.security.agents_support import export_of
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


def rooted(roots_dir: Path) -> set[str]:
    """What the GC roots in ``roots_dir`` keep: the paths their roots files reference
    (the server roots an evaluation's .drv files as the evaluator does, through one
    ``builtins.toFile`` file naming them all)."""
    return {ref for link in roots_dir.iterdir()
            for ref in subprocess.run(["nix-store", "--query", "--references",
                                       os.readlink(link)], capture_output=True, text=True,
                                      check=True).stdout.split()}


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
        # and rooted them for the evaluation, as an evaluation on this store roots its own
        assert rooted(tmp_path / "evaluator" / "gcroots" / f"eval-{first}") == set(drvs)
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


def upload_derivations(server: str, body: bytes, token: str = TOKEN,
                       evaluation: int | None = 1) -> requests.Response:
    params = {} if evaluation is None else {"evaluation": evaluation}
    return requests.put(f"{server}/api/v1/workers/derivations", data=body, params=params,
                        headers={"Authorization": f"Bearer {token}",
                                 "X-Circus-Worker": "eval2",
                                 "Content-Type": "application/octet-stream"},
                        timeout=60)


#: dep, and top naming dep and a source (data.txt): the closure an evaluator uploads
EXPRESSION = """
let
  mk = name: extra: derivation ({ inherit name; system = "@SYSTEM@"; builder = "/bin/sh"; }
                                // extra);
  dep = mk "forge-dep-@NONCE@" { args = [ "-c" "echo dep > $out" ]; };
in {
  inherit dep;
  top = mk "forge-top-@NONCE@" {
    data = ./data.txt;
    args = [ "-c" "read a < $data; read b < ${dep}; echo $a$b > $out" ];
  };
}
"""


def instantiated_in_private_store(directory: Path, nonce: str) -> tuple[list[str], bytes]:
    """The .drv closure (dependencies first) of EXPRESSION, instantiated in a private
    store (another host's), and its export; the files stay readable under
    ``directory/nix/store``."""
    (directory / "nix").mkdir(parents=True, exist_ok=True)
    source = directory / "src"
    source.mkdir()
    (source / "data.txt").write_text(f"data {nonce}\n")
    (source / "default.nix").write_text(
        EXPRESSION.replace("@SYSTEM@", current_system()).replace("@NONCE@", nonce[:12]))
    script = (f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && "
              f"closure=$(nix-store -qR $(nix-instantiate {shlex.quote(str(source))})) && "
              "echo $closure >&2 && nix-store --export $closure")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, check=True)
    return done.stderr.decode().strip().splitlines()[-1].split(), done.stdout


def ask_missing(server: str, paths: list[str], evaluation: int = 1) -> requests.Response:
    return requests.post(f"{server}/api/v1/workers/derivations/missing",
                         json={"paths": paths, "evaluation": evaluation},
                         headers={"Authorization": f"Bearer {TOKEN}",
                                  "X-Circus-Worker": "eval2"}, timeout=60)


def test_the_derivation_upload_refuses_what_is_not_an_evaluations_and_roots_the_rest(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        make_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        tmp_path: Path, nonce: str) -> None:
    """A token holder cannot get anything but derivations and their sources into the
    server's store, nor a forged derivation (to be built and signed under a legitimate
    one's path); what it may upload survives a garbage collection until the
    evaluation's builds are done. One server for every attack (it takes long to start)."""
    foreign, foreign_stream = exported_in_private_store(tmp_path / "evil", "not a derivation\n")
    other = tmp_path / "other"
    closure, stream = instantiated_in_private_store(other, nonce)
    data, dep, top = (next(p for p in closure if marker in p)
                      for marker in ("-data.txt", "-forge-dep-", "-forge-top-"))
    content = {p: (other / p.lstrip("/")).read_bytes() for p in closure}
    references = {dep: [], data: [], top: sorted([data, dep])}
    # dep's .drv (valid ATerm, another derivation) under top's path
    posing = export_of([(top, content[dep])], {top: []})
    # top's own .drv, declaring one reference fewer than its inputs
    dropped = export_of([(data, content[data]), (dep, content[dep]), (top, content[top])],
                        {**references, top: [data]})
    # a .drv at the right path for its content, whose output path is dep's (not the one
    # its content hashes to): Nix itself refuses it
    stolen_output = content[dep].decode().replace("echo dep", "echo evil").encode()
    stolen = storepath.make_text_path(storepath.name_of(dep),
                                      hashlib.sha256(stolen_output).digest(), [])
    # derivations are taken for evaluations in progress only
    world = World(committed_db, make_settings())
    first, second, finished = (world.trigger(world.jobset()) for _ in range(3))
    with committed_db() as session, session.begin():
        session.execute(update(Evaluation).where(Evaluation.id.in_([first, second]))
                        .values(status=EvaluationStatus.running))
        session.execute(update(Evaluation).where(Evaluation.id == finished)
                        .values(status=EvaluationStatus.completed))
    with server_and_runner(runner_config, tmp_path, workers=0) as (server, server_daemon):
        wrong = upload_derivations(server, foreign_stream, token="x" * 56)
        # a finished evaluation, or one not given out yet, would root them for nobody
        not_running = {"finished": upload_derivations(server, stream, evaluation=finished),
                       "unknown": upload_derivations(server, stream, evaluation=finished + 99),
                       "asked": ask_missing(server, closure, evaluation=finished)}
        refused = {name: upload_derivations(server, body, evaluation=first) for name, body in [
            ("stray", foreign_stream), ("garbage", b"\x01" + b"\0" * 100),
            ("posing", posing), ("dropped", dropped),
            ("stolen", export_of([(stolen, stolen_output)]))]}
        unnamed = upload_derivations(server, stream, evaluation=None)
        bad_path = ask_missing(server, [foreign, "/etc/passwd"], evaluation=first)
        asked = ask_missing(server, [foreign], evaluation=first)
        # nothing of the refused streams reached the store
        assert not any(valid_here(p) for p in [foreign, *closure, stolen])
        accepted = upload_derivations(server, stream, evaluation=first)
        # another evaluation needing the same derivations has nothing to upload, and
        # they are rooted for it too
        again = ask_missing(server, closure, evaluation=second)
        server_log = server_daemon.log()
    assert wrong.status_code == 401, wrong.text
    assert not_running["finished"].status_code == 409, not_running["finished"].text
    assert "is completed: only a running evaluation" in not_running["finished"].json()["error"]
    assert not_running["unknown"].status_code == 404, not_running["unknown"].text
    assert not_running["asked"].status_code == 409, not_running["asked"].text
    errors = {name: (answer.status_code, answer.json()["error"])
              for name, answer in refused.items()}
    assert errors["stray"][0] == 403
    assert "neither a derivation nor a source" in errors["stray"][1]
    assert errors["garbage"][0] == 403
    assert "not a valid export" in errors["garbage"][1]
    assert errors["posing"][0] == 403
    assert f"{top} is not the store path of its contents" in errors["posing"][1]
    assert errors["dropped"][0] == 403
    assert f"{top} declares the references" in errors["dropped"][1]
    assert errors["stolen"][0] == 409
    assert "incorrect output" in errors["stolen"][1]
    assert unnamed.status_code == 400, unnamed.text
    assert bad_path.status_code == 400, bad_path.text
    assert asked.status_code == 200, asked.text
    assert asked.json() == {"missing": [foreign]}
    assert accepted.status_code == 200, accepted.text
    assert sorted(accepted.json()["imported"]) == sorted(closure)
    assert again.json() == {"missing": []}
    assert "Traceback" not in server_log

    # a collection now (of exactly these paths and the roots files naming them, on this
    # shared store) keeps them: they are rooted for both evaluations as an evaluation's
    # own .drv files are
    settings = make_settings()
    assert not settings.evaluator.gc_roots_dir(finished).exists()
    roots_dirs = [settings.evaluator.gc_roots_dir(e) for e in (first, second)]
    assert [rooted(d) for d in roots_dirs] == [{dep, top}, {dep, top}]
    collected = sorted({os.readlink(link) for d in roots_dirs for link in d.iterdir()})
    collected += [top, dep, data]
    kept = subprocess.run(["nix-store", "--delete", *collected], capture_output=True,
                          text=True)
    assert kept.returncode != 0
    assert "still alive" in kept.stderr, kept.stderr
    assert all(valid_here(p) for p in closure)
    # the beat releases them with the evaluations' roots once the evaluations are done
    with committed_db() as session:
        assert not {first, second} & set(prune_gc_roots(session, settings))
        session.execute(update(Evaluation).where(Evaluation.id.in_([first, second]))
                        .values(status=EvaluationStatus.completed))
        session.commit()
        assert {first, second} <= set(prune_gc_roots(session, settings))
    deleted = subprocess.run(["nix-store", "--delete", *collected], capture_output=True,
                             text=True)
    assert deleted.returncode == 0, deleted.stderr
    assert not any(valid_here(p) for p in closure)
