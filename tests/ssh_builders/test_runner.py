"""``circus-queue-runner --workers 0`` building everything on real SSH builders."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.nix.derivation import read_derivation
from circus.queue_runner.steps.logs import read_log
from tests.helpers.daemons import wait_until
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds
from tests.ssh_builders.conftest import JOBS, SshHost, add_builders, ssh_settings


def statuses(factory: sessionmaker[Session], ids: list[int]) -> dict[int, BuildStatus]:
    with factory() as session:
        rows = session.execute(text("SELECT id, status FROM builds WHERE id = ANY(:ids)"),
                               {"ids": ids}).all()
    return {r.id: BuildStatus(r.status) for r in rows}


def step_of(factory: sessionmaker[Session], drv: str) -> Any:
    with factory() as session:
        return session.execute(text(
            "SELECT * FROM steps WHERE drv_path = :d AND state = 'done'"), {"d": drv}
        ).mappings().one()


def valid_here(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path],
                          capture_output=True).returncode == 0


def out(drv: str) -> str:
    return read_derivation(drv).output_paths["out"]


def test_runner_builds_a_dag_on_ssh_builders(
        runner_config: Callable[..., dict[str, Any]], committed_db: sessionmaker[Session],
        ssh_host: Callable[[str], SshHost], nix_env: dict[str, str], nonce: str,
        tmp_path: Path) -> None:
    plain = ssh_host("plain")
    kvm = ssh_host("kvm")
    add_builders(committed_db, plain.row(max_jobs=2),
                 kvm.row(mandatory_features=["kvm"], supported_features=["kvm"]))
    jobs = ["top", "uses", "fails", "talker", "kvmjob"]
    drvs = instantiate(["local", "dep", *jobs], nonce, nix_env, expr=JOBS)
    # an input the runner has and the builders lack: it has to travel there
    subprocess.run(["nix-store", "--realise", drvs["local"]], env=nix_env, check=True,
                   capture_output=True)
    source = next(p for p in read_derivation(drvs["uses"]).input_srcs if "ssh-input" in p)
    config = runner_config(queue_runner=ssh_settings(unsupported_timeout=30))
    with runner_daemon("qr-ssh", config, tmp_path, workers=0) as runner:
        with committed_db() as session:
            builds = make_builds(session, {j: drvs[j] for j in jobs})
        ids = [b.id for b in builds.values()]
        # the log streams into the runner's log directory while the build runs
        logs = tmp_path / "logs"
        wait_until(lambda: any(b"first line" in p.read_bytes()
                               for p in logs.rglob("*talker*.log")),
                   timeout=60, message="live log of the talker")
        assert not any(b"second line" in p.read_bytes() for p in logs.rglob("*talker*.log"))
        wait_until(lambda: all(s.is_finished for s in statuses(committed_db, ids).values()),
                   timeout=90, interval=0.25, message="builds finished")
        log = runner.log()
        print(log[-3000:])
    assert "Traceback" not in log
    result = {job: statuses(committed_db, [b.id])[b.id] for job, b in builds.items()}
    assert result == {"top": BuildStatus.succeeded, "uses": BuildStatus.succeeded,
                      "fails": BuildStatus.failed, "talker": BuildStatus.succeeded,
                      "kvmjob": BuildStatus.succeeded}, result
    # a mandatory-kvm builder takes only kvm steps; everything else went to "plain"
    machines = {job: step_of(committed_db, drvs[job])["machine"] for job in [*jobs, "dep"]}
    assert machines == {"top": "plain", "dep": "plain", "uses": "plain", "fails": "plain",
                        "talker": "plain", "kvmjob": "kvm"}, machines
    # outputs came home; inputs went out
    for job in ("top", "dep", "uses", "talker", "kvmjob"):
        assert valid_here(out(drvs[job])), job
    assert plain.has(out(drvs["local"]))
    assert plain.has(source)
    assert plain.has(drvs["top"])
    assert plain.has(out(drvs["top"]))
    assert not kvm.has(out(drvs["top"]))
    assert kvm.has(out(drvs["kvmjob"]))
    assert read_log(step_of(committed_db, drvs["top"])["log_path"]).startswith(b"building top")
    assert b"second line" in read_log(step_of(committed_db, drvs["talker"])["log_path"])
    failed = step_of(committed_db, drvs["fails"])
    assert failed["exit_code"] == 3
    assert "exit code 3" in failed["error_message"]
