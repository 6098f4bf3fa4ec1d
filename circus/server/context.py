"""Per-application and per-request state of the server."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings


@dataclass
class ServerContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]


def server_context(app: Flask | None = None) -> ServerContext:
    context: ServerContext = (app or current_app).extensions["circus"]
    return context


def settings() -> Settings:
    return server_context().settings


def db_session() -> Session:
    """The request's session, opened on first use and closed at teardown."""
    session: Session | None = g.get("_circus_session")
    if session is None:
        session = server_context().session_factory()
        g._circus_session = session
    return session


def close_db_session(exc: BaseException | None = None) -> None:
    session: Session | None = g.pop("_circus_session", None)
    if session is not None:
        if exc is not None:
            session.rollback()
        session.close()
