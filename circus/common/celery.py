"""Celery app factory and the base task that opens a database session per task."""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, cast

from celery import Celery, Task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import celeryconfig
from circus.common import logcontext
from circus.common.config import Settings
from circus.common.db import after_commit, make_engine, make_session_factory
from circus.common.kombu_redis import guard_closed_transport

#: modules whose tasks every Circus Celery app registers
TASK_MODULES = (
    "circus.evaluator.tasks",
    "circus.queue_runner.tasks",
    "circus.cache.tasks",
    "circus.auth.tasks",
    "circus.notifications.tasks",
)


@dataclass
class CircusContext:
    """What tasks need besides their arguments, attached to the Celery app."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]


_local = threading.local()


def task_ids(run: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, object]:
    """The build/step/evaluation ids among a task's arguments, by parameter name."""
    try:
        named = inspect.signature(run).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        named = kwargs
    return {key: named[key] for key in logcontext.KEYS if isinstance(named.get(key), int)}


class DbTask(Task):  # type: ignore[misc]
    """A task with ``self.session``: opened on first use, closed when the task returns.

    Task objects are shared by the threads of a worker, so the session lives in
    thread-local storage, never on the task.
    """

    abstract = True

    @property
    def circus(self) -> CircusContext:
        return context_of(self.app)

    @property
    def settings(self) -> Settings:
        return self.circus.settings

    @property
    def session(self) -> Session:
        session: Session | None = getattr(_local, "session", None)
        if session is None:
            session = self.circus.session_factory()
            _local.session = session
        return session

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # tasks take ids: log lines written while one runs carry them
        with logcontext.bound(**task_ids(self.run, args, kwargs)):
            return super().__call__(*args, **kwargs)

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        session: Session | None = getattr(_local, "session", None)
        if session is not None:
            session.close()
            _local.session = None


def context_of(app: Celery) -> CircusContext:
    context = getattr(app, "circus", None)
    if context is None:
        raise RuntimeError("this Celery app was not made by create_celery_app()")
    return cast(CircusContext, context)


def create_celery_app(settings: Settings, *, name: str = "circus",
                      engine: Engine | None = None) -> Celery:
    guard_closed_transport()
    app = Celery(name, task_cls=DbTask, set_as_current=True)
    app.conf.update(celeryconfig.celery_settings(settings))
    engine = engine or make_engine(settings, application_name=name)
    app.circus = CircusContext(settings, engine, make_session_factory(engine))
    app.set_default()
    import importlib

    for module in TASK_MODULES:
        importlib.import_module(module)
    return app


def enqueue(session: Session, task_name: str, *args: Any, queue: str,
            app: Celery | None = None, **options: Any) -> None:
    """Send a task by name once ``session`` commits (ids only, never ORM objects).

    Services use this for every hand-off, so a rolled-back transaction never
    leaves a message behind and a consumer always finds the rows it is told about.
    """
    from celery import current_app

    def send() -> None:
        (app or current_app).send_task(task_name, args=list(args), queue=queue, **options)

    after_commit(session, send)
