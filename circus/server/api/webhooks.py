"""/api/v1/webhooks/{project}/{forge}: deliveries from GitHub, Gitea, Forgejo, GitLab.

Forges send no API key: these views never resolve the caller (``current_actor``)
and are exempt from CSRF (see ``circus.server.auth``). The delivery's signature
(or GitLab's token) against the webhook's secret is the only credential.
"""

from __future__ import annotations

from typing import Any

from flask import request
from werkzeug.routing import BaseConverter

from circus.common.enums import ForgeType
from circus.server.api.base import Blueprint
from circus.server.api.schemas.webhooks import WebhookReceivedSchema
from circus.server.context import db_session, settings
from circus.server.security import client_address
from circus.webhooks import service

blp = Blueprint("webhooks", __name__, url_prefix="/api/v1/webhooks",
                description="Inbound forge webhooks (authenticated by signature)")

#: the endpoint ``circus.server.auth`` exempts from CSRF (forges post cross-site)
ENDPOINT = "webhooks.receive"

_BODY = {"required": True, "description": "the forge's event payload, as it sends it",
         "content": {media: {"schema": {"type": "object"}}
                     for media in ("application/json", "application/x-www-form-urlencoded")}}


class ForgeConverter(BaseConverter):
    """One of the forges (anything else is a 404 from routing)."""

    regex = "|".join(f.value for f in ForgeType)


def forge_schema(converter: Any) -> dict[str, Any]:
    return {"type": "string", "enum": [f.value for f in ForgeType]}


@blp.post("/<name:project>/<forge:forge>")
@blp.doc(requestBody=_BODY, security=[])
@blp.response(200, WebhookReceivedSchema)
def receive(project: str, forge: str) -> Any:
    """Receive a forge delivery: a push triggers the jobsets on that branch, a pull or
    merge request creates pull-request evaluations, a ping answers ``pong``.

    GitHub signs with ``X-Hub-Signature-256``, Gitea with ``X-Gitea-Signature``,
    Forgejo with ``X-Forgejo-Signature`` (HMAC-SHA256 of the body); GitLab sends the
    secret in ``X-Gitlab-Token``. Missing credentials: 401; wrong ones: 403; unknown
    project, forge or disabled webhook: 404; malformed body: 400.
    """
    session = db_session()
    result = service.receive(
        session, settings(), project_ref=project, forge=forge,
        headers={name.lower(): value for name, value in request.headers.items()},
        body=request.get_data(cache=True), remote_addr=client_address())
    session.commit()
    return result
