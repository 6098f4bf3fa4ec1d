"""Fixtures for external logins: a real slapd, a GitHub OAuth stub, apps configured for them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.config import Settings
from tests.api.conftest import Keys, make_app
from tests.auth_providers.github_stub import GithubStub
from tests.auth_providers.slapd import TEMPLATE, Slapd, start_slapd


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    directory = tmp_path_factory.mktemp("slapd")
    server = start_slapd(directory)
    try:
        yield server
    finally:
        server.daemon.stop()
        shutil.rmtree(directory / "db", ignore_errors=True)


@pytest.fixture(scope="session")
def github_server() -> Iterator[GithubStub]:
    stub = GithubStub().start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def github(github_server: GithubStub) -> GithubStub:
    """The stub with a fresh state (no account logged in, no codes, no tokens)."""
    github_server.reset()
    return github_server


def ldap_section(slapd: Slapd, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "uri": slapd.uri, "bind_dn_template": TEMPLATE, "timeout": 5,
            **extra}


@pytest.fixture
def make_client(make_settings: Callable[..., Settings], engine: Engine, db: Session
                ) -> Callable[..., FlaskClient]:
    """A test client of an app built from ``make_settings(**sections)`` in the test's
    rolled-back transaction (login rate limits generous unless overridden)."""

    def make(**sections: Any) -> FlaskClient:
        server = {"rate_limit_api": "100000/minute", "rate_limit_login": "1000/minute",
                  **sections.pop("server", {})}
        app = make_app(make_settings(server=server, **sections), engine, db)
        return app.test_client()

    return make


@pytest.fixture
def keys(db: Session) -> Keys:
    return Keys(db)
