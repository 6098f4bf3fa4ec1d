"""``server.products_origin``: build products viewed in a browser come from an origin of
their own (GitHub's ``*.githubusercontent.com``), never from the one holding the session.

When it is set, the dashboard's product download checks who asks, as always, and then
redirects to ``<products_origin>/files/<grant>/<file>``: the grant is a signed, short-lived
token naming one product of one build, placed in the path so that relative links inside
an HTML directory product keep working. The products origin (the same server, reached by
another host name) serves only these files and answers 404 to everything else; the main
origin answers 404 to ``/files``. Without the setting the route does not exist at all.
"""

from __future__ import annotations

import mimetypes
from urllib.parse import quote, urlsplit

from flask import Blueprint, Flask, Response, abort, request, send_file
from flask.typing import ResponseReturnValue
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select

from circus.common.config import Settings
from circus.common.errors import NotFound
from circus.common.models import BuildOutput, BuildProduct
from circus.server.context import db_session, settings
from circus.server.security import build_output

blueprint = Blueprint("usercontent", __name__)

#: how long a product link stays valid (seconds): long enough to read a manual
GRANT_SECS = 3600
_SALT = "circus-product-grant"


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings().server.secret_key or "", salt=_SALT)


def products_host(config: Settings) -> str | None:
    origin = config.server.products_origin
    return urlsplit(origin).netloc.lower() if origin else None


def product_link(build_id: int, product_id: int, sub: str | None) -> str:
    """Where the products origin serves this product (the caller checked access)."""
    origin = settings().server.products_origin
    assert origin is not None
    grant = _serializer().dumps([build_id, product_id])
    return f"{origin.rstrip('/')}/files/{grant}/" + quote(sub or "")


def _on_products_host() -> bool:
    return (request.host or "").lower() == products_host(settings())


def init_app(app: Flask, config: Settings) -> None:
    if not config.server.products_origin:
        return
    app.register_blueprint(blueprint)

    @app.before_request
    def keep_origins_apart() -> ResponseReturnValue | None:
        serving_files = request.endpoint == "usercontent.files"
        if _on_products_host() != serving_files:
            # session-bearing pages never on the products origin, products never on ours
            abort(404)
        return None


@blueprint.get("/files/<grant>/")
@blueprint.get("/files/<grant>/<path:sub>")
@build_output()
def files(grant: str, sub: str | None = None) -> Response:
    from circus.server.api.buildfiles import product_file

    try:
        build_id, product_id = _serializer().loads(grant, max_age=GRANT_SECS)
    except (BadSignature, ValueError, TypeError):
        raise NotFound("no such file (the link is invalid or has expired)") from None
    session = db_session()
    product = session.get(BuildProduct, product_id)
    if product is None or product.build_id != build_id:
        raise NotFound("no such file")
    outputs = list(session.scalars(select(BuildOutput.path).where(
        BuildOutput.build_id == build_id)))
    path = product_file(product, outputs, sub or None)
    mimetype = (product.content_type if not product.is_directory else None) or \
        mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return send_file(path, mimetype=mimetype, download_name=path.name, conditional=True)
