"""The binary cache as part of the server."""

from __future__ import annotations

from flask import Flask

from circus.server.cache.fastpath import NarinfoFastPath
from circus.server.cache.lookup import CacheIndex
from circus.server.cache.views import blueprint
from circus.server.context import server_context
from circus.server.counters import tally
from circus.server.security import response_headers


def init_app(app: Flask) -> None:
    context = server_context(app)
    if not context.settings.cache.enabled:
        return
    index = CacheIndex(context.engine, context.settings.cache)
    app.extensions["circus_cache"] = index
    app.register_blueprint(blueprint)
    # cached narinfo answers skip Flask entirely (see fastpath.py for why)
    app.wsgi_app = NarinfoFastPath(app.wsgi_app, index,  # type: ignore[method-assign]
                                   context.settings.cache.narinfo_cache_ttl_secs, tally(app),
                                   response_headers(context.settings))
