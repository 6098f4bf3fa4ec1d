from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.orm import Session

import celeryconfig
from circus.common.celery import DbTask, create_celery_app
from circus.common.config import Settings
from circus.common.db import after_commit


def test_celery_settings_come_from_the_circus_config(make_settings: Callable[..., Settings]
                                                     ) -> None:
    settings = make_settings(broker={"url": "amqp://guest:guest@127.0.0.1:5672//"})
    conf = celeryconfig.celery_settings(settings)
    assert conf["broker_url"] == "amqp://guest:guest@127.0.0.1:5672//"
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert {q.name for q in conf["task_queues"]} == {"eval", "dispatch", "notifications",
                                                      "maintenance"}
    assert conf["beat_schedule"]["evaluator-tick"]["schedule"].total_seconds() == \
        settings.evaluator.poll_interval
    assert conf["worker_send_task_events"] is conf["task_send_sent_event"] is False
    events = celeryconfig.celery_settings(make_settings(broker={"task_events": True}))
    assert events["worker_send_task_events"] is events["task_send_sent_event"] is True
    # visibility_timeout is Redis' own: an AMQP broker gets no transport options
    assert conf["broker_transport_options"] == {}
    assert events["broker_transport_options"]["visibility_timeout"] > 0


def test_base_task_opens_and_closes_a_session(settings: Settings, engine: Engine) -> None:
    app = create_celery_app(settings, engine=engine)
    app.conf.task_always_eager = True
    seen: list[Session] = []

    @app.task(base=DbTask, bind=True, name="tests.session_probe")
    def probe(self: DbTask) -> int:
        seen.append(self.session)
        from sqlalchemy import text

        return int(self.session.execute(text("SELECT 41 + 1")).scalar_one())

    assert probe.delay().get() == 42
    assert probe.delay().get() == 42
    assert len(seen) == 2
    assert seen[0] is not seen[1]


def test_after_commit_runs_only_on_commit(db: Session) -> None:
    calls: list[str] = []
    after_commit(db, lambda: calls.append("first"))
    db.rollback()
    assert calls == []
    after_commit(db, lambda: calls.append("second"))
    db.commit()
    assert calls == ["second"]


def test_a_failing_callback_does_not_break_the_commit(db: Session) -> None:
    calls: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    after_commit(db, broken)
    after_commit(db, lambda: calls.append("still runs"))
    db.commit()
    assert calls == ["still runs"]
