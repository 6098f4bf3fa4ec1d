"""``circus-evaluator`` as a real daemon: beat ticks, checks and evaluations over Redis."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from sqlalchemy import select

from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, TriggerKind
from circus.common.models import Evaluation
from tests.evaluator.conftest import World
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.helpers.gitrepo import GitRepo


def _config(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / "circus.toml"
    path.write_text(f"""
[database]
url = "{settings.database.url}"
[broker]
url = "{settings.broker.url}"
[nix]
substituters = []
[evaluator]
work_dir = "{settings.evaluator.work_dir}"
poll_interval = 1
max_concurrent_evals = 1
[tracing]
level = "info"
""")
    return path


def test_the_daemon_evaluates_due_jobsets_and_manual_triggers(
        world: World, flake_repo: GitRepo, tmp_path: Path, nix_env: dict[str, str]) -> None:
    jobset_id = world.jobset(flake_repo.url)
    env = {**nix_env, "CIRCUS_CONFIG_FILE": str(_config(world.settings, tmp_path))}
    with Daemon("evaluator", [circus_command("circus-evaluator")], tmp_path / "logs",
                env=env, cwd=tmp_path) as daemon:

        def finished() -> list[Evaluation]:
            with world.factory() as session:
                return list(session.scalars(select(Evaluation).where(
                    Evaluation.jobset_id == jobset_id,
                    Evaluation.status == EvaluationStatus.completed)))

        wait_until(lambda: len(finished()) == 1 or not daemon.alive(), timeout=90,
                   message="the scheduled evaluation")
        assert daemon.alive(), daemon.log()[-3000:]
        scheduled = finished()[0]
        assert scheduled.trigger_kind is TriggerKind.source_change
        assert len(world.builds(scheduled.id)) == 8

        # what the API does: trigger, commit; the worker picks it up
        manual = world.trigger(jobset_id)
        wait_until(lambda: world.evaluation(manual).status.is_finished, timeout=60,
                   message="the manual evaluation")
        evaluation = world.evaluation(manual)
        assert evaluation.status is EvaluationStatus.completed, daemon.log()[-3000:]
        assert evaluation.builds_reused == 8
        # later ticks find nothing new
        assert world.count_evaluations(jobset_id) == 2
        assert world.jobset_row(jobset_id).last_check_outcome in ("evaluated", "unchanged")


def _children_named(root: int, names: tuple[str, ...]) -> list[int]:
    """Processes below ``root`` whose command name is one of ``names``."""
    parents: dict[int, int] = {}
    comms: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comms[int(entry.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                todo.append(pid)
                if comms[pid] in names:
                    found.append(pid)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_the_evaluator_takes_its_nix_evaluation_down(
        world: World, flake_repo: GitRepo, tmp_path: Path, nix_env: dict[str, str]) -> None:
    """The evaluation program (nix-eval-jobs, or nix-instantiate) runs in a session of its
    own; it used to go on evaluating, an orphan, after a kill -9 of the evaluator."""
    jobset_id = world.jobset(flake_repo.url)
    env = {**nix_env, "CIRCUS_CONFIG_FILE": str(_config(world.settings, tmp_path))}
    programs = ("nix-eval-jobs", "nix-instantiate")
    with Daemon("evaluator", [circus_command("circus-evaluator")], tmp_path / "logs",
                env=env, cwd=tmp_path) as daemon:
        found: list[int] = []

        def evaluating() -> bool:
            found[:] = _children_named(daemon.pid, programs)
            return bool(found) or not daemon.alive()

        wait_until(evaluating, timeout=90, interval=0.005, message="the evaluation program")
        assert daemon.alive(), daemon.log()[-3000:]
        # frozen, the evaluation cannot finish before the kill, however fast this machine
        for pid in found:
            os.kill(pid, signal.SIGSTOP)
        os.kill(daemon.pid, signal.SIGKILL)
        try:
            wait_until(lambda: not any(_running(pid) for pid in found), timeout=10,
                       interval=0.05, message="the evaluation program gone")
        finally:
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert world.latest(jobset_id) is not None
