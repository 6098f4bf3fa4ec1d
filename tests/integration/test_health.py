from __future__ import annotations

from circus.common.config import Settings
from circus.common.db import make_engine, make_session_factory
from circus.common.heartbeat import beat
from circus.common.tokens import token_digest
from circus.server.app import create_app


def test_health_reports_database_broker_and_daemons(settings: Settings, committed_db: object
                                                    ) -> None:
    engine = make_engine(settings)
    with make_session_factory(engine).begin() as session:
        beat(session, "evaluator")
    app = create_app(settings, engine=engine)
    response = app.test_client().get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["database"] == {"ok": True}
    assert body["broker"] == {"ok": True}
    assert [d["kind"] for d in body["daemons"]] == ["evaluator"]
    assert body["daemons"][0]["fresh"] is True
    assert body["status"] == "ok"
    engine.dispose()


def test_health_is_503_when_the_broker_is_down(make_settings: object) -> None:
    settings = make_settings(broker={"url": "redis://127.0.0.1:1/0"})  # type: ignore[operator]
    app = create_app(settings)
    response = app.test_client().get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["broker"]["ok"] is False
    assert body["database"]["ok"] is True
    assert body["status"] == "unavailable"


def test_health_is_503_when_the_database_is_down(make_settings: object) -> None:
    settings = make_settings(database={  # type: ignore[operator]
        "url": "postgresql://nobody@127.0.0.1:1/none", "connect_timeout": 1})
    app = create_app(settings)
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json()["database"]["ok"] is False


def test_creating_the_app_opens_no_database_connection(settings: Settings) -> None:
    """gunicorn forks workers after create_app: a pooled connection opened before the
    fork would be shared by every worker and corrupt their results under load."""
    from sqlalchemy import event

    engine = make_engine(settings)
    opened: list[object] = []
    event.listen(engine, "connect", lambda *args: opened.append(args))
    scraper = "scraper-token-0123456789abcdef"
    settings = settings.model_copy(update={"server": settings.server.model_copy(
        update={"metrics_tokens": [token_digest(scraper)]})})
    app = create_app(settings, engine=engine)
    assert opened == []
    assert app.test_client().get(
        "/metrics", headers={"Authorization": f"Bearer {scraper}"}).status_code == 200
    assert len(opened) == 1
    engine.dispose()
