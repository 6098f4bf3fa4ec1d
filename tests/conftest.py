"""Shared fixtures: real PostgreSQL, Redis, Nix and git for every test.

PostgreSQL: ``CIRCUS_TEST_DATABASE_URL`` (a server URL; a fresh database is
created on it) or a private cluster under a temp dir. Redis:
``CIRCUS_TEST_REDIS_URL`` or a private server on a Unix socket. Nix must work:
when it does not, the session fails loudly instead of skipping tests.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings, load_settings
from circus.common.db import normalise_url
from circus.common.localservices import PrivatePostgres, PrivateRedis
from circus.common.nix.environment import nix_environ
from tests.helpers.audit import install_finish_audit, remove_finish_audit
from tests.helpers.gitrepo import GitRepo

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------
# PostgreSQL


@contextmanager
def private_postgres_server(kind: str) -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of its own, started; removed afterwards."""
    # /tmp is reachable for the postgres user; pytest's root-owned 0700 base dir is not
    directory = Path(f"/tmp/circus-test-{kind}-{os.getpid()}-{secrets.token_hex(3)}")
    server = PrivatePostgres(directory, durable=False)
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("CIRCUS_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    with private_postgres_server("pg") as server:
        yield server.url("postgres")


@pytest.fixture
def own_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL of this test alone (for tests that stop and start it)."""
    with private_postgres_server("own-pg") as server:
        yield server


def _create_database(server_url: str, name: str) -> str:
    admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(normalise_url(server_url)).set(database=name).render_as_string(
        hide_password=False)


def _drop_database(server_url: str, name: str) -> None:
    admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def create_database(postgres_server_url: str) -> Iterator[Callable[[str], str]]:
    """Make an extra empty database; returns its URL. Dropped at session end."""
    made: list[str] = []

    def create(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        made.append(name)
        return _create_database(postgres_server_url, name)

    yield create
    for name in made:
        _drop_database(postgres_server_url, name)


@pytest.fixture(scope="session")
def database_url(create_database: Callable[[str], str]) -> str:
    """A database migrated to head, shared by the whole session."""
    from circus.cli.migrate import upgrade

    url = create_database("circus_test")
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(normalise_url(database_url), pool_size=5, max_overflow=20)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test.

    ``session.commit()`` releases a savepoint only, so tests see their own
    writes and leave nothing behind.
    """
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint",
                      expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


def truncate_all(engine: Engine) -> None:
    from sqlalchemy.exc import OperationalError

    from circus.common.models import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    # a daemon of the test may still be stopping and reading these tables: PostgreSQL
    # then picks one side of the lock cycle to fail, possibly ours; try again
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            return
        except OperationalError as exc:
            if "deadlock detected" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.5)


@pytest.fixture
def committed_db(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Real commits (for tests with daemons in other processes); tables emptied after."""
    truncate_all(engine)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    truncate_all(engine)


@pytest.fixture
def finish_audit(engine: Engine, committed_db: sessionmaker[Session]) -> Iterator[None]:
    """Record every transition of a build or step into a finished state
    (:mod:`tests.helpers.audit`: ``finish_counts``)."""
    install_finish_audit(engine)
    try:
        yield
    finally:
        remove_finish_audit(engine)


# ---------------------------------------------------------------------------
# Order: the files of slow tests first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a ``slow`` test (the long end-to-end ones) run first, in their
    collection order, the others after them in theirs.

    ``make test`` hands whole files to two workers in this order (``--dist loadfile
    --no-loadscope-reorder``): longest first keeps both workers busy to the end, the
    short files filling in. xdist's default order (most tests first) left the long
    files, which have few tests, for last: one worker ran them while the other idled.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    # stable: each file's tests stay together and in order (module-scoped daemons)
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def up_root(tmp_path: Path) -> Iterator[Path]:
    """A directory for ``circus up`` state directories, reachable by the postgres user
    (each cluster lives inside its state directory); every instance in it is stopped
    and removed afterwards, their daemon logs kept in ``tmp_path``
    (tests.helpers.circus_up.instance_root)."""
    from tests.helpers.circus_up import instance_root

    with instance_root("up", keep_logs_in=tmp_path) as root:
        yield root


# ---------------------------------------------------------------------------
# Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("CIRCUS_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    directory = Path(f"/tmp/circus-test-redis-{os.getpid()}-{secrets.token_hex(3)}")
    server = PrivateRedis(directory, durable=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


# ---------------------------------------------------------------------------
# RabbitMQ: a private node, started only for the tests that ask for it


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[Any]:
    """A private RabbitMQ node (tests.helpers.rabbitmq.RabbitNode) for the session.

    It listens on 0.0.0.0 so that network-namespace hosts reach it at their
    ``main_address`` (``node.url_for(host.main_address)``); ``node.url`` is loopback.
    """
    from tests.helpers.rabbitmq import private_rabbitmq

    directory = Path(f"/tmp/circus-test-rabbitmq-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with private_rabbitmq(directory, listen="0.0.0.0") as node:
            yield node
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


# ---------------------------------------------------------------------------
# Nix


@pytest.fixture(scope="session")
def nix_env() -> dict[str, str]:
    """The offline Nix environment; fails the session when Nix cannot build."""
    env = nix_environ([])
    expr = ('derivation { name = "circus-nix-check"; builder = "/bin/sh"; '
            'args = ["-c" "echo ok > $out"]; system = builtins.currentSystem; }')
    done = subprocess.run(["nix-build", "--no-out-link", "-E", expr], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        pytest.fail(f"Nix is not usable here (make setup installs it): {done.stderr}",
                    pytrace=False)
    return env


# ---------------------------------------------------------------------------
# Circus settings and git


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str, redis_url: str,
                  ) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "database": {"url": database_url},
            "broker": {"url": redis_url},
            # per app: tests share one Redis, and their logins must not share a budget
            "server": {"secret_key": "test-secret-key-" + "x" * 32,
                       "rate_limit_storage": "memory://"},
            "nix": {"substituters": []},
            "evaluator": {"work_dir": str(tmp_path / "evaluator")},
            "logs": {"log_dir": str(tmp_path / "logs")},
            "cache": {"cache_dir": str(tmp_path / "cache")},
            "gc": {"gc_roots_dir": str(tmp_path / "gcroots")},
        }
        for section, values in overrides.items():
            base.setdefault(section, {}).update(values)
        return load_settings(files=[], environ={}, overrides=base)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def git_repo(tmp_path: Path) -> Callable[..., GitRepo]:
    counter = iter(range(1000))

    def make(name: str | None = None, branch: str = "main") -> GitRepo:
        return GitRepo(tmp_path / (name or f"repo{next(counter)}"), branch=branch)

    return make


@pytest.fixture
def nonce() -> str:
    """A unique string to put into derivations so each test builds fresh paths."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------
# Binary-cache signing keys made by Nix itself (cache and agent tests)


@dataclass(frozen=True)
class KeyPair:
    secret: str
    public: str


def _nix_key(directory: Path, name: str) -> KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    secret, public = directory / f"{name}.sec", directory / f"{name}.pub"
    subprocess.run(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)],
                   check=True, env=nix_environ([]))
    return KeyPair(secret.read_text().strip(), public.read_text().strip())


@pytest.fixture(scope="session")
def cache_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """Circus's signing key, generated by ``nix-store --generate-binary-cache-key``."""
    return _nix_key(tmp_path_factory.mktemp("keys"), "circus-test-cache-1")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A key with the same name but different bytes: Nix must refuse its signatures."""
    return _nix_key(tmp_path_factory.mktemp("other-keys"), "circus-test-cache-1")


# ---------------------------------------------------------------------------
# S3: a real SeaweedFS server (it checks signatures and expiry; moto does not)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def upload_settings(self, prefix: str, **extra: Any) -> dict[str, Any]:
        return {"enabled": True, "store_uri": f"s3://{self.bucket}/{prefix}", "retries": 1,
                "s3": {"endpoint_url": self.endpoint, "access_key_id": self.access_key,
                       "secret_access_key": self.secret_key, "use_path_style": True,
                       "region": "us-east-1"}, **extra}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    import json

    from tests.helpers.daemons import Daemon, circus_command
    from tests.helpers.net import free_port, wait_for_port

    work = tmp_path_factory.mktemp("seaweedfs")
    access, secret = "circus-test-access", "circus-test-secret-" + uuid.uuid4().hex
    (work / "s3.json").write_text(json.dumps({"identities": [{
        "name": "circus", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    # free_port() only says a port was free a moment ago: another test's daemon may
    # take one of the ten before SeaweedFS binds it (it then exits at once); start
    # again on fresh ports
    for attempt in range(3):
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
        data = work / f"data-{attempt}"
        argv = [circus_command("weed"), "mini", f"-dir={data}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
                "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={work / 's3.json'}", "-bucket=circus-test",
                *[f"-{name}={port}" for name, port in ports.items()]]
        data.mkdir()
        daemon = Daemon(f"seaweedfs-{attempt}", argv, work, cwd=work).start()
        try:
            wait_for_port(ports["s3.port"], timeout=60)
            server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", "circus-test", access,
                              secret)
            _wait_for_bucket(server, daemon)
        except (RuntimeError, TimeoutError):
            daemon.stop()
            if attempt == 2 or "address already in use" not in daemon.log():
                raise
            continue
        try:
            yield server
        finally:
            daemon.stop()
        return


def _wait_for_bucket(server: S3Server, daemon: Any) -> None:
    import time

    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}))
    deadline = time.monotonic() + 60
    while True:
        try:
            client.put_object(Bucket=server.bucket, Key="ready", Body=b"ok")
            return
        except Exception:
            if time.monotonic() > deadline or not daemon.alive():
                raise RuntimeError(f"SeaweedFS did not come up:\n{daemon.log()[-3000:]}"
                                   ) from None
            time.sleep(0.2)
