"""What circus-server's master prepares before forking its workers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import create_engine

from circus.server.warmup import open_first_connection, warm_up


def test_warm_up_compiles_every_page_template_before_a_request(app: Flask) -> None:
    environment = app.jinja_env
    templates = [name for name in environment.list_templates() if name.endswith(".html")]
    assert "jobset.html" in templates
    assert "base.html" in templates
    cached_before = {key[1] for key in (environment.cache or {})}
    assert "jobset.html" not in cached_before

    warm_up(app)

    cached = {key[1] for key in (environment.cache or {})}
    assert set(templates) <= cached, set(templates) - cached


def test_a_template_that_does_not_compile_fails_the_warm_up(app: Flask, tmp_path: Path) -> None:
    # a broken template stops the server at start, not at a user's first page
    (tmp_path / "broken.html").write_text("{% for x in %}")
    from jinja2 import ChoiceLoader, FileSystemLoader, TemplateSyntaxError

    app.jinja_loader  # noqa: B018 - Flask builds the environment's loader lazily
    app.jinja_env.loader = ChoiceLoader([app.jinja_env.loader, FileSystemLoader(tmp_path)])
    with pytest.raises(TemplateSyntaxError):
        warm_up(app)


def test_the_first_connection_is_opened_ahead_and_a_missing_database_is_no_error(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine(database_url)
    try:
        open_first_connection(engine)
        assert engine.pool.checkedin() == 1
    finally:
        engine.dispose()
    down = create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none",
                         connect_args={"connect_timeout": 2})
    with caplog.at_level(logging.INFO, logger="circus.server.warmup"):
        open_first_connection(down)
    assert down.pool.checkedin() == 0
    assert "no database connection opened ahead" in caplog.text
