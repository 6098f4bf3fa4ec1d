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
import uuid
from collections.abc import Callable, Iterator
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
from tests.helpers.gitrepo import GitRepo

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("CIRCUS_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    # /tmp is reachable for the postgres user; pytest's root-owned 0700 base dir is not
    directory = Path(f"/tmp/circus-test-pg-{os.getpid()}-{secrets.token_hex(3)}")
    server = PrivatePostgres(directory)
    server.start()
    try:
        yield server.url("postgres")
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


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
    from circus.common.models import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture
def committed_db(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Real commits (for tests with daemons in other processes); tables emptied after."""
    truncate_all(engine)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    truncate_all(engine)


# ---------------------------------------------------------------------------
# Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("CIRCUS_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    directory = Path(f"/tmp/circus-test-redis-{os.getpid()}-{secrets.token_hex(3)}")
    server = PrivateRedis(directory)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
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
            "server": {"secret_key": "test-secret-key-" + "x" * 32},
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
