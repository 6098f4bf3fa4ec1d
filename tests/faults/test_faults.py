"""The fault suite (issue 13): one ``circus up`` instance under load, one fault at a time.

One instance serves every fault (the suite has a 3-minute budget on 2 cores): each
fault gets a round of its own, a fresh layered DAG of sleeping derivations (a new
commit of the instance's repository, so nothing is cached), and the fault is
injected at a random point of that round (seeded; the seed is printed, and
``CIRCUS_FAULT_SEED`` replays it). After each fault:

- every build of the round reaches a terminal state (none lost) and, except where
  the fault is meant to fail builds, succeeds;
- no step finished twice and no build finished twice (triggers count every
  transition into a finished state, ``tests.helpers.audit``), one step per
  derivation, one build per derivation;
- no process the instance ran before the fault is left outside ``circus up``'s
  process tree (no orphan ``nix-store``, builder or gunicorn worker of a dead daemon);
- the logs of finished builds read back intact through the API;
- every succeeded build is post-processed: its outputs are in the binary cache and
  no ``pending_postprocessing`` row is left (a fault between the finish and the
  post-processing only delays it, by ``postprocess_retry_secs``);
- the API answers a cheap route within 3 times its before-fault median + 200 ms;
- both agents (below) still run and are connected again (whatever the fault).

Two agents, each alone on a network-namespace host with its own ``/nix``
(``tests.helpers.netns``), build for the instance's gateway. They are reserved
for ``AGENT_FEATURE`` (a mandatory feature): the jobs that require it go to them
and nothing else does, so the local workers build the rest at their own speed
(agents taking ordinary steps, with their inputs and outputs copied both ways,
made every round slower: the suite grew by twice the agent rounds' time). Agent
jobs are in the rounds where an agent holding a step matters: the agents' own
faults (kill -9 of the agent, then started again; the host's link cut, then
plugged back in), the queue runner's kill (the gateway dies with it),
PostgreSQL's stop (the gateway on a database outage) and the full log
filesystem (the gateway's log sinks). After the agents' own faults, also: every
step the agent held finished exactly once, and nothing of the agent's builds
(``nix-store``, builder) is left running on its host.

The instance's lease, republish and beat intervals are shortened (the production
defaults are tens of seconds) so that recovery fits the budget; the recovery times
in the figures are for these settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from circus.common.db import normalise_url
from circus.common.localservices import PrivatePostgres
from tests.agents.conftest import TOKEN_DIGEST, write_agent_config
from tests.helpers.audit import finish_counts, install_finish_audit
from tests.helpers.circus_up import (
    Client,
    alive,
    health_ok,
    pids_of,
    remove_instance,
    start,
)
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.helpers.gitrepo import GitRepo
from tests.helpers.net import free_port
from tests.helpers.netns import NetnsHost, network_host

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("CIRCUS_FAULT_SEED") or secrets.randbelow(2**31))
LAYERS, WIDTH = 4, 6
JOBS = LAYERS * WIDTH
#: the log directory's filesystem: small enough to fill in a moment
LOG_FS_SIZE = "1m"
#: the settings that bound recovery (see the module docstring)
TUNING = {
    "CIRCUS_QUEUE_RUNNER__WORKERS": "3",
    "CIRCUS_QUEUE_RUNNER__LEASE_SECS": "4",
    "CIRCUS_QUEUE_RUNNER__REPUBLISH_SECS": "3",
    "CIRCUS_QUEUE_RUNNER__POLL_INTERVAL": "2",
    "CIRCUS_QUEUE_RUNNER__RETRY_BACKOFF_SECS": "1",
    "CIRCUS_QUEUE_RUNNER__POSTPROCESS_RETRY_SECS": "2",
    "CIRCUS_EVALUATOR__POLL_INTERVAL": "2",
}
#: a system feature only the agents declare: the jobs requiring it go to them
AGENT_FEATURE = "circus-fault-agent"
#: per layer (but the first) of an agent round, the jobs that require it
AGENT_JOBS = 2
#: how long an agent job sleeps: the fault lands while it builds
AGENT_SLEEP = 1.2
AGENT_NAMES = ("agent-a", "agent-b")
#: seconds of silence after which the gateway drops an agent, and after which an
#: agent gives up on an unanswered heartbeat (production: 60 and 30)
HEARTBEAT_TTL = 3
UNFINISHED = (0, 1)
SUCCEEDED = 2
ROUND_TIMEOUT = 90.0
#: post-processing after the round: in-process ~1 s, a retry 2 s after the finish and
#: then back-off (the database or the queue runner may have been the fault)
POSTPROCESS_TIMEOUT = 30.0
#: what the evaluator runs to evaluate a jobset (nix-eval-jobs when installed)
EVALUATION_PROGRAMS = ("nix-eval-jobs", "nix-instantiate")
CHEAP_ROUTE = "/api/v1/projects"


def dag_flake(tag: str, nonce: str, agent_jobs: int = 0) -> str:
    """``LAYERS`` by ``WIDTH`` jobs; each job of a layer needs two of the layer below.

    ``agent_jobs``: in every layer but the first and the last (fewer layers of slow
    jobs: a shorter round), that many jobs require ``AGENT_FEATURE`` (only the agents
    offer it) and sleep ``AGENT_SLEEP``."""
    lines = []
    for layer in range(LAYERS):
        for i in range(WIDTH):
            deps = "" if layer == 0 else \
                f"l{layer - 1}_{i} l{layer - 1}_{(i + 1) % WIDTH}"
            maker = "agentJob" if 0 < layer < LAYERS - 1 and i < agent_jobs else "job"
            lines.append(f'      l{layer}_{i} = {maker} "l{layer}_{i}" [ {deps} ];')
    names = " ".join(f"l{layer}_{i}" for layer in range(LAYERS) for i in range(WIDTH))
    return f"""{{
  outputs = {{ self }}:
    let
      system = "x86_64-linux";
      mk = sleep: extra: name: deps: derivation ({{
        name = "fault-{tag}-${{name}}";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" ("export PATH=/usr/bin:/bin; echo log of ${{name}} {nonce}; "
          + "sleep ${{sleep}}; echo {nonce} ${{toString deps}} > $out") ];
      }} // extra);
      job = mk "0.2" {{ }};
      agentJob = mk "{AGENT_SLEEP}" {{ requiredSystemFeatures = [ "{AGENT_FEATURE}" ]; }};
{chr(10).join(lines)}
    in {{ hydraJobs = {{ inherit {names}; }}; }};
}}
"""


# --------------------------------------------------------------------- processes


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, start time in clock ticks, command name)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[19]), comm)
    return table


def descendants(root: int, table: dict[int, tuple[int, int, str]]) -> dict[int, tuple[int, str]]:
    """Every process below ``root``: pid → (start time, command name)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = (table[pid][1], table[pid][2])
        todo.extend(children.get(pid, []))
    return found


def orphans(before: dict[int, tuple[int, str]], up_pid: int) -> list[str]:
    """Processes of ``before`` still running but no longer under ``circus up``."""
    table = process_table()
    now_under = descendants(up_pid, table)
    return [f"{pid} {comm}" for pid, (started, comm) in before.items()
            if pid in table and table[pid][1] == started and pid not in now_under]


# --------------------------------------------------------------------- the instance


@dataclass
class Round:
    tag: str
    nonce: str
    triggered_at: float
    #: its builds' logs must read back whole (not so while the log disk is full)
    logs_kept: bool = True


@dataclass
class Figures:
    fault: str
    injected_at: str
    builds: int
    lost: int
    duplicates: int
    failed: int
    recovery_s: float
    round_s: float
    latency_ms: float


@dataclass
class Agent:
    """An agent alone on its host; ``daemon`` is started again after a kill."""

    name: str
    host: NetnsHost
    daemon: Daemon

    def leftovers(self) -> list[int]:
        """Processes on the host other than the agent itself (its builds)."""
        own = {self.daemon.pid} if self.daemon.alive() else set()
        return [pid for pid in self.host.pids() if pid not in own]


@dataclass
class Instance:
    root: Path
    state: Path
    log_dir: Path
    base: str
    up: Daemon
    client: Client
    engine: Engine
    repo: GitRepo
    rng: random.Random
    baseline_ms: float = 0.0
    figures: list[Figures] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)

    # rounds -----------------------------------------------------------

    def commit_round(self, tag: str, agent_jobs: int = 0) -> Round:
        nonce = secrets.token_hex(6)
        self.repo.commit({"flake.nix": dag_flake(tag, nonce, agent_jobs)},
                         message=f"round {tag}")
        return Round(tag, nonce, time.monotonic())

    def trigger_round(self, tag: str, agent_jobs: int = 0) -> Round:
        round_ = self.commit_round(tag, agent_jobs)
        self.rounds.append(round_)
        self.client.post("/api/v1/evaluations/trigger", {"project": "demo", "jobset": "main"})
        return round_

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            return list(conn.execute(text(query), params).all())

    def builds(self, round_: Round) -> list[Any]:
        return self.sql("SELECT id, job_name, drv_path, status FROM builds "
                        "WHERE nix_name LIKE :p ORDER BY id", p=f"fault-{round_.tag}-%")

    def terminal(self, round_: Round) -> int:
        return sum(1 for b in self.builds(round_) if b.status not in UNFINISHED)

    def wait_terminal(self, round_: Round, count: int = JOBS,
                      timeout: float = ROUND_TIMEOUT) -> None:
        def reached() -> bool:
            try:
                return self.terminal(round_) >= count
            except OperationalError:  # the database may be the fault
                return False

        try:
            wait_until(reached, timeout=timeout, interval=0.2,
                       message=f"{count} builds of round {round_.tag} terminal")
        except TimeoutError:
            print(self.daemon_logs())
            raise

    def running_steps(self) -> int:
        return int(self.sql("SELECT count(*) FROM steps WHERE state = 'running'")[0][0])

    def running_on(self, machine: str) -> list[int]:
        return [row.id for row in self.sql(
            "SELECT id FROM steps WHERE state = 'running' AND machine = :m ORDER BY id",
            m=machine)]

    def building_on(self, agent: Agent) -> list[int]:
        """The steps leased to the agent that it accepted (it is building them)."""
        log = agent.daemon.log()
        return [s for s in self.running_on(agent.name) if f"accepted step {s} " in log]

    def connected(self) -> list[str]:
        return [row.name for row in self.sql(
            "SELECT name FROM builder_sessions WHERE connected ORDER BY name")]

    def wait_connected(self, timeout: float = 60) -> None:
        wait_until(lambda: self.connected() == sorted(a.name for a in self.agents),
                   timeout=timeout, interval=0.1, message="every agent connected")

    def daemon_logs(self) -> str:
        parts = []
        agent_logs = [agent.daemon.log_path for agent in self.agents]
        for log in sorted((self.state / "daemon-logs").glob("*.log")) + agent_logs:
            parts.append(f"==== {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # health -----------------------------------------------------------

    def latency_ms(self, samples: int) -> float:
        self.client.get(CHEAP_ROUTE)  # a fresh worker's first request warms it
        times = []
        for _ in range(samples):
            started = time.monotonic()
            self.client.get(CHEAP_ROUTE)
            times.append(time.monotonic() - started)
        return statistics.median(times) * 1000

    def whole(self) -> bool:
        """Healthy: database and broker reachable, every supervised daemon running."""
        if not health_ok(self.base):
            return False
        status = json.loads((self.state / "supervisor.json").read_text())
        return all(info["running"] and info["pid"] and alive(info["pid"])
                   for info in status["daemons"].values())

    def wait_whole(self, since: float, timeout: float = 60) -> float:
        wait_until(self.whole, timeout=timeout, interval=0.1, message="instance whole again")
        return time.monotonic() - since

    def restarts(self) -> dict[str, int]:
        status = json.loads((self.state / "supervisor.json").read_text())
        return {name: int(info["restarts"]) for name, info in status["daemons"].items()}

    def tree(self) -> dict[int, tuple[int, str]]:
        return descendants(self.up.pid, process_table())

    # the checks after a fault -----------------------------------------

    def check(self, fault: str, round_: Round, injected_at: str, recovery_s: float,
              before: dict[int, tuple[int, str]],
              logs_of: set[int] | None = None) -> Figures:
        """Wait for the round and check it; ``logs_of``: the builds whose logs must be
        whole (default: every succeeded one)."""
        try:
            self.wait_terminal(round_)
        except TimeoutError:
            pass   # counted as lost below
        round_s = time.monotonic() - round_.triggered_at
        rows = self.builds(round_)
        terminal = [b for b in rows if b.status not in UNFINISHED]
        lost = JOBS - len(terminal)
        failed = sum(1 for b in terminal if b.status != SUCCEEDED)
        with self.engine.begin() as conn:
            build_finishes = finish_counts(conn, "build")
            step_finishes = finish_counts(conn, "step")
            steps = conn.execute(text(
                "SELECT id, drv_path FROM steps WHERE drv_path = ANY(:d)"),
                {"d": [b.drv_path for b in rows]}).all()
        duplicates = (sum(build_finishes.get(b.id, 0) > 1 for b in rows)
                      + sum(step_finishes.get(s.id, 0) > 1 for s in steps)
                      + len(steps) - len({s.drv_path for s in steps})
                      + len(rows) - len({b.drv_path for b in rows}))
        wait_until(lambda: not orphans(before, self.up.pid), timeout=15, interval=0.2,
                   message=f"no orphans after {fault}: {orphans(before, self.up.pid)}")
        succeeded = [b.id for b in terminal if b.status == SUCCEEDED]
        try:
            wait_until(lambda: not self.unpublished(succeeded), timeout=POSTPROCESS_TIMEOUT,
                       interval=0.2, message=f"post-processing after {fault}")
        except TimeoutError:
            pass   # reported by the assertion below
        unpublished = self.unpublished(succeeded)
        latency = self.latency_ms(7)
        figures = Figures(fault, injected_at, len(rows), lost, duplicates, failed,
                          round(recovery_s, 2), round(round_s, 1), round(latency, 1))
        self.figures.append(figures)
        print(f"{fault}: {asdict(figures)}")

        assert lost == 0, f"{lost} builds of round {round_.tag} lost\n{self.daemon_logs()}"
        assert len(rows) == JOBS
        assert duplicates == 0, (build_finishes, step_finishes)
        assert all(build_finishes.get(b.id) == 1 for b in terminal)
        assert failed == 0, [tuple(b) for b in terminal if b.status != SUCCEEDED]
        assert not unpublished, f"not post-processed: {unpublished}\n{self.daemon_logs()}"
        self.check_logs(round_, [b for b in terminal if b.status == SUCCEEDED
                                 and (logs_of is None or b.id in logs_of)])
        for earlier in [r for r in self.rounds[:-1] if r.logs_kept]:
            sample = self.rng.sample(self.builds(earlier), 3)
            self.check_logs(earlier, [b for b in sample if b.status == SUCCEEDED])
        assert self.up.alive(), self.daemon_logs()
        assert latency < 3 * self.baseline_ms + 200, (latency, self.baseline_ms)
        quit_agents = [agent.name for agent in self.agents if not agent.daemon.alive()]
        assert not quit_agents, f"agents exited: {quit_agents}\n{self.daemon_logs()}"
        self.wait_connected()
        return figures

    def unpublished(self, build_ids: list[int]) -> list[tuple[int, str]]:
        """Builds whose post-processing is pending, or outputs missing from the cache."""
        return [tuple(row) for row in self.sql("""
            SELECT build_id, 'pending' FROM pending_postprocessing
            WHERE build_id = ANY(:ids)
            UNION ALL
            SELECT o.build_id, o.path FROM build_outputs o
            WHERE o.build_id = ANY(:ids)
              AND NOT EXISTS (SELECT 1 FROM narinfo_cache n WHERE n.store_path = o.path)
        """, ids=build_ids)]

    def check_logs(self, round_: Round, builds: list[Any]) -> None:
        for build in builds:
            log = self.client.text(f"/api/v1/builds/{build.id}/log")
            assert log is not None, build.job_name
            assert f"log of {build.job_name} {round_.nonce}" in log, (build.job_name, log)


def _mount_tmpfs(directory: Path, size: str) -> None:
    directory.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                           "circus-fault-logs", str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the fault suite mounts a tmpfs (run as root): {done.stderr}",
                    pytrace=False)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Iterator[Instance]:
    print(f"fault suite seed: {SEED} (CIRCUS_FAULT_SEED={SEED} replays it)")
    # /tmp: reachable by the postgres user, so the cluster lives inside (and goes with) root
    root = Path(f"/tmp/circus-faults-{os.getpid()}-{secrets.token_hex(3)}")
    root.mkdir(mode=0o755)
    state, log_dir = root / "state", root / "logs"
    output = tmp_path_factory.mktemp("faults")
    _mount_tmpfs(log_dir, LOG_FS_SIZE)
    up: Daemon | None = None
    agents = ExitStack()
    try:
        # the repository exists before circus up starts: its first evaluation has no
        # jobs, so the audit triggers are in place before anything builds
        repo = GitRepo(state / "demo-repo")
        repo.commit({"flake.nix": "{ outputs = { self }: { hydraJobs = { }; }; }\n"},
                    message="no jobs yet")
        port, gateway_port = free_port(), free_port()
        up, password, _ = start(state, port, root, extra_env={
            **TUNING, "CIRCUS_LOGS__LOG_DIR": str(log_dir),
            # all addresses: the agents' hosts reach it on their own veth links
            "CIRCUS_QUEUE_RUNNER__RPC__BIND": f"0.0.0.0:{gateway_port}",
            "CIRCUS_QUEUE_RUNNER__RPC__ALLOW_PLAINTEXT": "true",
            "CIRCUS_QUEUE_RUNNER__RPC__AUTH_TOKENS": json.dumps([TOKEN_DIGEST]),
            "CIRCUS_QUEUE_RUNNER__RPC__HEARTBEAT_TTL_SECS": str(HEARTBEAT_TTL),
            # every agent reports this one loaded machine's CPU pressure: no gate
            "CIRCUS_QUEUE_RUNNER__PSI_THRESHOLD": "100"})
        engine = create_engine(normalise_url(PrivatePostgres(state / "postgres").url("circus")),
                               poolclass=NullPool)
        install_finish_audit(engine)
        base = f"http://127.0.0.1:{port}"
        inst = Instance(root, state, log_dir, base, up, Client(base, password), engine, repo,
                        random.Random(SEED))
        inst.agents = [start_agent(agents, root / "agents" / name, gateway_port, name)
                       for name in AGENT_NAMES]
        inst.wait_connected()
        # a trigger while the first evaluation runs would answer with that one
        wait_until(lambda: inst.sql("SELECT count(*) FILTER (WHERE status = 'completed'), "
                                    "count(*) FILTER (WHERE status IN ('pending', 'running')) "
                                    "FROM evaluations")[0] == (1, 0),
                   timeout=60, interval=0.2, message="the first (empty) evaluation done")
        before = inst.tree()
        first = inst.trigger_round("r0")
        inst.wait_terminal(first)
        inst.baseline_ms = inst.latency_ms(15)
        inst.check("none (load only)", first, "-", 0.0, before)
        yield inst
        report(inst, output / "figures.json", request)
    finally:
        agents.close()   # the agents stop, then their hosts go
        if up is not None:
            up.stop(timeout=60)
        # the daemons' logs outlive the instance, for a failed run (one that failed
        # before circus up made them must still remove the rest)
        (output / "daemon-logs").mkdir(exist_ok=True)
        if (state / "daemon-logs").is_dir():
            shutil.copytree(state / "daemon-logs", output / "daemon-logs", dirs_exist_ok=True)
        for log in (root / "agents").glob("*/*.log"):
            shutil.copy(log, output / "daemon-logs" / log.name)
        subprocess.run(["umount", "-l", str(log_dir)], check=False)
        # what a failed stop left running goes too (rmtree alone leaves a PostgreSQL
        # running on deleted files)
        remove_instance(state)
        shutil.rmtree(root, ignore_errors=True)


def start_agent(stack: ExitStack, directory: Path, port: int, name: str) -> Agent:
    """An agent alone on a fresh host (own address, link and /nix), reserved for
    ``AGENT_FEATURE``; one job at a time, so a layer's agent jobs spread over both."""
    host = stack.enter_context(network_host(nix_store=directory / "nix"))
    config = write_agent_config(directory, port, address=host.main_address, name=name,
                                max_jobs=1, mandatory_features=[AGENT_FEATURE],
                                heartbeat_timeout_secs=HEARTBEAT_TTL)
    daemon = host.daemon(name, [circus_command("circus-agent"), "--config", str(config)],
                         directory)
    return Agent(name, host, stack.enter_context(daemon))


def report(inst: Instance, path: Path, request: pytest.FixtureRequest) -> None:
    path.write_text(json.dumps({"seed": SEED, "baseline_latency_ms": round(inst.baseline_ms, 1),
                                "faults": [asdict(f) for f in inst.figures]}, indent=2))
    lines = [f"fault figures (seed {SEED}, baseline latency {inst.baseline_ms:.0f} ms; "
             f"{path})",
             f"{'fault':34s} {'injected at':30s} builds lost dup failed recovery_s round_s "
             "latency_ms"]
    lines += [f"{f.fault:34s} {f.injected_at:30s} {f.builds:6d} {f.lost:4d} {f.duplicates:3d} "
              f"{f.failed:6d} {f.recovery_s:10.2f} {f.round_s:7.1f} {f.latency_ms:10.1f}"
              for f in inst.figures]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)


# --------------------------------------------------------------------- the faults


def kill_daemon(inst: Instance, name: str) -> tuple[float, dict[int, tuple[int, str]]]:
    """kill -9 of the daemon's main process only (as the OOM killer does); returns the
    time of the kill and the instance's processes just before it."""
    victim = pids_of(inst.state)[name]
    before = inst.tree()
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: pids_of(inst.state).get(name) not in (None, victim), timeout=30,
               interval=0.1, message=f"{name} restarted")
    return killed, before


def test_kill_9_server(instance: Instance) -> None:
    round_ = instance.trigger_round("server")
    delay = instance.rng.uniform(0.2, 3.0)
    time.sleep(delay)
    killed, before = kill_daemon(instance, "circus-server")
    recovery = instance.wait_whole(killed)
    instance.check("kill -9 circus-server", round_, f"{delay:.1f} s after the trigger",
                   recovery, before)


def test_kill_9_evaluator_during_an_evaluation(instance: Instance) -> None:
    """Killed on an observed state: the evaluation program running (a few hundred ms
    for this flake, less on a faster machine), frozen with SIGSTOP so it cannot finish
    before the kill. It must die with the evaluator (a parent-death signal: SIGKILL
    reaches a stopped process); a survivor is an orphan the checks report."""
    evaluator = pids_of(instance.state)["circus-evaluator"]
    round_ = instance.trigger_round("evaluator")
    programs: list[tuple[int, str]] = []

    def evaluating() -> bool:
        programs[:] = [(pid, comm) for pid, (_, comm)
                       in descendants(evaluator, process_table()).items()
                       if comm in EVALUATION_PROGRAMS]
        return bool(programs)

    wait_until(evaluating, timeout=30, interval=0.005, message="the evaluation program")
    for pid, _ in programs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    evaluation = instance.sql("SELECT id FROM evaluations WHERE status = 'running'")[0].id
    # the evaluator waits on its frozen program for a random while, then dies
    delay = instance.rng.uniform(0.0, 0.5)
    time.sleep(delay)
    killed, before = kill_daemon(instance, "circus-evaluator")
    status = instance.sql("SELECT status FROM evaluations WHERE id = :i", i=evaluation)[0][0]
    assert status == "running", "the evaluation finished before the kill"
    recovery = instance.wait_whole(killed)
    instance.check("kill -9 circus-evaluator", round_,
                   f"{programs[0][1]} of evaluation {evaluation} running, frozen "
                   f"{delay * 1000:.0f} ms", recovery, before)


def test_kill_9_queue_runner_during_builds(instance: Instance) -> None:
    round_ = instance.trigger_round("queue-runner", agent_jobs=AGENT_JOBS)
    done = instance.rng.randint(2, JOBS // 2)
    wait_until(lambda: instance.terminal(round_) >= done and instance.running_steps() > 0,
               timeout=60, interval=0.05, message="builds running")
    killed, before = kill_daemon(instance, "circus-queue-runner")
    recovery = instance.wait_whole(killed)
    instance.check("kill -9 circus-queue-runner", round_,
                   f"{done}/{JOBS} builds done, steps running", recovery, before)


def test_redis_killed_and_restarted(instance: Instance) -> None:
    round_ = instance.trigger_round("redis")
    done = instance.rng.randint(2, JOBS // 2)
    instance.wait_terminal(round_, done)
    before = instance.tree()
    restarts = instance.restarts()
    pid_file = instance.state / "redis" / "redis.pid"
    victim = int(pid_file.read_text())
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() not in ("", str(victim)),
               timeout=30, interval=0.1, message="Redis started again")
    recovery = instance.wait_whole(killed)
    instance.check("kill -9 Redis (restarted)", round_, f"{done}/{JOBS} builds done",
                   recovery, before)
    assert instance.restarts() == restarts


def test_postgres_fast_stopped_and_restarted(instance: Instance) -> None:
    round_ = instance.trigger_round("postgres", agent_jobs=AGENT_JOBS)
    done = instance.rng.randint(2, JOBS // 2)
    instance.wait_terminal(round_, done)
    before = instance.tree()
    restarts = instance.restarts()
    stopped = time.monotonic()
    PrivatePostgres(instance.state / "postgres").stop()   # pg_ctl stop -m fast
    recovery = instance.wait_whole(stopped)
    instance.check("pg_ctl stop -m fast (restarted)", round_, f"{done}/{JOBS} builds done",
                   recovery, before)
    assert instance.restarts() == restarts


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory``; returns the file holding the space."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 512):   # unbuffered: every byte that fits is written
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_log_filesystem_full(instance: Instance) -> None:
    before = instance.tree()
    restarts = instance.restarts()
    filler = fill(instance.log_dir)
    full = instance.trigger_round("logs-full", agent_jobs=AGENT_JOBS)
    full.logs_kept = False
    # every build still ends, without (most of) its log; no daemon falls over
    instance.check("log filesystem full", full, "full before the trigger", 0.0, before,
                   logs_of=set())
    assert instance.restarts() == restarts, "a daemon crashed on the full log filesystem"

    filler.unlink()
    freed = time.monotonic()
    before = instance.tree()
    after = instance.trigger_round("logs-freed")
    wait_until(lambda: any(instance.log_dir.glob("*/*-fault-logs-freed-*")), timeout=60,
               interval=0.05, message="a new log written after space was freed")
    recovery = time.monotonic() - freed
    instance.check("log filesystem freed again", after, "space freed before the trigger",
                   recovery, before)
    assert instance.restarts() == restarts


def agent_mid_build(inst: Instance, tag: str) -> tuple[Round, Agent, list[int], str]:
    """An agent round, up to a random moment while an agent builds; returns the round,
    that agent, the steps it holds and where in the round that is."""
    round_ = inst.trigger_round(tag, agent_jobs=AGENT_JOBS)
    building: list[Agent] = []

    def some_agent_building() -> bool:
        building[:] = [agent for agent in inst.agents if inst.building_on(agent)]
        return bool(building)

    # the step fetches its inputs, then sleeps AGENT_SLEEP: the fault lands well inside
    # it; on a loaded machine the step seen may have been an ordinary short one that
    # ended meanwhile: look again (the round has four agent-only steps)
    for _attempt in range(4):
        wait_until(some_agent_building, timeout=60, interval=0.05,
                   message="a step building on an agent")
        victim = inst.rng.choice(building)
        delay = inst.rng.uniform(0.1, AGENT_SLEEP / 2)
        time.sleep(delay)
        held = inst.running_on(victim.name)
        if held:
            break
    assert held, f"{victim.name}'s step finished before the fault, four times"
    done = inst.terminal(round_)
    return round_, victim, held, (f"{done}/{JOBS} builds done, {len(held)} step(s) on "
                                  f"the agent, {delay:.1f} s in")


def wait_steps_done(inst: Instance, steps: list[int], since: float, what: str) -> float:
    wait_until(lambda: {row.state for row in inst.sql(
        "SELECT state FROM steps WHERE id = ANY(:ids)", ids=steps)} == {"done"},
        timeout=ROUND_TIMEOUT, interval=0.1, message=what)
    return time.monotonic() - since


def check_held_steps(inst: Instance, steps: list[int]) -> None:
    """Each step the faulted agent held: done, and finished exactly once."""
    with inst.engine.begin() as conn:
        finishes = finish_counts(conn, "step")
    assert {finishes.get(step) for step in steps} == {1}, (steps, finishes)


def test_kill_9_agent_mid_build(instance: Instance) -> None:
    """kill -9 of the agent's process only: its nix-store dies with it (a parent-death
    signal) and takes the builder along; the closed connection hands its steps back at
    once. The agent is started again, as its service manager would."""
    round_, victim, held, injected_at = agent_mid_build(instance, "agent-kill")
    before = instance.tree()
    os.kill(victim.daemon.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not victim.daemon.alive(), timeout=10, message="the agent dead")
    wait_until(lambda: victim.host.pids() == [], timeout=10, interval=0.1,
               message=f"no process left on {victim.name}'s host: {victim.host.pids()}")
    victim.daemon.start()
    recovery = wait_steps_done(instance, held, killed, "the killed agent's steps finished")
    instance.wait_connected()
    instance.check("kill -9 agent (restarted)", round_, injected_at, recovery, before)
    check_held_steps(instance, held)


def test_agent_network_cut_mid_build(instance: Instance) -> None:
    """The host's link goes down: no connection closes, the gateway drops the agent
    after HEARTBEAT_TTL seconds of silence and hands its steps to the other agent; the
    agent, its heartbeat unanswered as long, stops its builds. Then the link is back."""
    round_, victim, held, injected_at = agent_mid_build(instance, "agent-cut")
    before = instance.tree()
    victim.host.cut()
    cut = time.monotonic()
    try:
        recovery = wait_steps_done(instance, held, cut, "the cut agent's steps finished")
        # nothing builds on behind the cut: the agent stopped its builds
        wait_until(lambda: victim.leftovers() == [], timeout=15, interval=0.1,
                   message=f"no build left on the cut host: {victim.leftovers()}")
    finally:
        victim.host.restore()
    instance.wait_connected()
    assert victim.daemon.alive(), victim.daemon.log()
    instance.check("agent's network cut (restored)", round_, injected_at, recovery, before)
    check_held_steps(instance, held)
