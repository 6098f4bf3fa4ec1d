"""Private PostgreSQL and Redis instances under a directory.

Used by ``circus up`` when no database or broker is configured, and by the test
suite. They use the system binaries (Debian's postgresql and redis-server),
listen on Unix sockets only (no port clashes with system services), and keep
their data under the given directory so a second start reuses it.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

POSTGRES_USER = "postgres"
#: where a cluster lives when the postgres user cannot reach the requested directory
FALLBACK_ROOT = Path("/var/lib/circus")


class ServiceError(RuntimeError):
    pass


def pg_bindir() -> Path:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ServiceError("PostgreSQL server binaries not found (apt install postgresql)")


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when its parent dies, even by kill -9.

    ``circus up`` starts its daemons with it so none outlives it as an orphan that keeps
    the port and the queue. libc is loaded here, in the parent: the child, between fork
    and exec, only makes the one system call.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return set_parent_death_signal


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root
    if os.geteuid() == 0:
        return ["runuser", "-u", POSTGRES_USER, "--", *argv]
    return argv


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(POSTGRES_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _write_note(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in a directory the postgres user owns, as a new file:
    never through a symlink or onto a file it put there (root writes it; the postgres
    user must not be able to turn that into a write of root's elsewhere)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as note:
        note.write(text)


def _postgres_can_reach(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    check = subprocess.run(_as_postgres(["test", "-x", str(path)]), capture_output=True)
    return check.returncode == 0


class PrivatePostgres:
    """A PostgreSQL cluster in ``directory`` reachable through a socket in it."""

    def __init__(self, directory: Path, port: int = 5432, durable: bool = True) -> None:
        self.directory = directory.resolve()
        self.port = port
        #: PostgreSQL's crash-safe defaults; only test harnesses and benchmarks, whose
        #: data is thrown away, may ask for fsync off (a power cut then corrupts it)
        self.durable = durable
        # an earlier start may have put the cluster elsewhere (see _fallback_home)
        moved = (self.directory / "LOCATION").exists()
        self._locate(self._fallback_home() if moved else self.directory)

    def _locate(self, home: Path) -> None:
        self.home = home
        self.data_dir = home / "data"
        self.socket_dir = home / "run"
        self.log_file = home / "postgres.log"

    def _fallback_home(self) -> Path:
        """Where the cluster lives when the postgres user cannot reach ``directory``.

        A checkout under /root (mode 0700) is the usual case. The place is derived
        from the requested directory, so the next start finds the same cluster.
        """
        digest = hashlib.sha256(str(self.directory).encode()).hexdigest()[:16]
        return FALLBACK_ROOT / f"postgres-{digest}"

    @property
    def outside(self) -> bool:
        """The cluster lives elsewhere (``home``): removing ``directory`` (the state
        directory) leaves it behind, 50 MB or more."""
        return not self.home.is_relative_to(self.directory)

    def url(self, database: str = "postgres") -> str:
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{POSTGRES_USER}@/{database}?host={host}&port={self.port}"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), *args]
        return subprocess.run(_as_postgres(argv), capture_output=True, text=True)

    def is_running(self) -> bool:
        if not self.data_dir.exists():
            return False
        self._wait_for_killed_postmaster()
        return self._pg_ctl("status").returncode == 0

    def _wait_for_killed_postmaster(self, timeout: float = 20.0) -> None:
        """A postmaster killed a moment ago stays a zombie until reaped, and pg_ctl and
        the socket lock count it as running: wait until it is gone."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
            except (OSError, IndexError):
                return
            if state != "Z":
                return
            time.sleep(0.1)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _chown_to_postgres(self.directory)
        if not _postgres_can_reach(self.directory):
            fallback = self._fallback_home()
            self._locate(fallback)
            _write_note(self.directory / "LOCATION",
                        f"PostgreSQL data lives in {fallback}: the postgres user cannot reach "
                        f"{self.directory}\n")
        for path in (self.home, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            _chown_to_postgres(path)
        if self.outside:
            # the way back: whose cluster this is, once that directory is gone
            # (orphaned_clusters)
            _write_note(self.home / "OWNER", f"{self.directory}\n")
        if not _postgres_can_reach(self.home):
            raise ServiceError(
                f"the postgres user cannot reach {self.home}; choose a state directory "
                "outside private home directories (e.g. --state-dir /var/lib/circus)")
        if not (self.data_dir / "PG_VERSION").exists():
            initdb = [str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "-U",
                      POSTGRES_USER, "-A", "trust", "-E", "UTF8",
                      *([] if self.durable else ["--no-sync"])]
            done = subprocess.run(_as_postgres(initdb), capture_output=True, text=True)
            if done.returncode != 0:
                raise ServiceError(f"initdb failed: {done.stderr.strip()}")
        if self.is_running():
            return
        # a stale pid file from a killed instance keeps pg_ctl from starting
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            pid_file.unlink()
        # trust authentication on the socket: only its owner (and root, whose daemons use
        # it) may connect, never a build user running a pull request's derivation
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
                   f"-c unix_socket_permissions=0700 -c port={self.port} -c max_connections=300")
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        started = self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options)
        if started.returncode != 0:
            log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise ServiceError(f"PostgreSQL did not start: {started.stderr.strip()}\n{log}")

    def stop(self) -> None:
        if self.data_dir.exists():
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30")

    def remove(self) -> None:
        """Stop the cluster and delete it with ``directory``, wherever it lives (the
        fallback home outside it too)."""
        self.stop()
        self._wait_for_killed_postmaster()
        for path in (self.home, self.directory):
            shutil.rmtree(path, ignore_errors=True)

    def create_database(self, name: str) -> None:
        psql = shutil.which("psql") or str(pg_bindir() / "psql")
        exists = subprocess.run(
            [psql, "-h", str(self.socket_dir), "-p", str(self.port), "-U", POSTGRES_USER,
             "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True, text=True, check=True)
        if exists.stdout.strip() != "1":
            subprocess.run(
                [psql, "-h", str(self.socket_dir), "-p", str(self.port), "-U", POSTGRES_USER,
                 "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'],
                capture_output=True, text=True, check=True)


def orphaned_clusters(root: Path = FALLBACK_ROOT) -> list[tuple[Path, Path]]:
    """(cluster, former directory) of the fallback clusters under ``root`` whose
    directory no longer points at them (its ``LOCATION`` note is gone: the state
    directory was removed) and whose postmaster is not running.

    Only reported, never removed here: a state directory on a file system that is not
    mounted yet looks the same. A cluster made before ``OWNER`` was written is unknown.
    """
    found = []
    for home in sorted(root.glob("postgres-*")):
        try:
            owner = Path((home / "OWNER").read_text().strip())
        except OSError:
            continue
        if (owner / "LOCATION").exists() or _postmaster_alive(home / "data"):
            continue
        found.append((home, owner))
    return found


def _postmaster_alive(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


class PrivateRedis:
    """A Redis server on a Unix socket in ``directory`` (no TCP port)."""

    def __init__(self, directory: Path, durable: bool = True) -> None:
        self.directory = directory.resolve()
        #: an append-only file synced every second: queued Celery messages and rate-limit
        #: counters survive a crash (the build queue itself lives in PostgreSQL)
        self.durable = durable
        self.socket = self.directory / "redis.sock"
        self.pid_file = self.directory / "redis.pid"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server not found (apt install redis-server)")
        if self.socket.exists():
            self.socket.unlink()
        self.process = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "yes" if self.durable else "no",
             "--appendfsync", "everysec", "--dir", str(self.directory),
             "--pidfile", str(self.pid_file), "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError("redis-server did not start; see "
                                   f"{self.directory / 'redis.log'}")
            time.sleep(0.05)

    def is_running(self) -> bool:
        if self.process is not None:
            # our child: a killed one is a zombie until polled, which os.kill(pid, 0) misses
            return self.process.poll() is None
        return self._alive()

    def _alive(self) -> bool:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return self.socket.exists()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None
            return
        try:
            os.kill(int(self.pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
