"""The dashboard: server-rendered pages for people, mounted at ``/``.

Views call the same service functions (and shared read queries) as the REST
API, never the API over HTTP. Pages work without JavaScript; a small script
adds the live log tail. Who may see which page is ``server.page_access``
(see :mod:`circus.server.dashboard.access`).
"""

from __future__ import annotations

from flask import Flask

from circus.server.dashboard.blueprint import blueprint


def init_app(app: Flask) -> None:
    # importing the view modules registers their routes on the blueprint
    from circus.server.dashboard import errors, formatting, layout, views  # noqa: F401

    formatting.init_app(app)
    app.register_blueprint(blueprint)
