"""/api/v1/channels: channels point at an evaluation of a jobset (Hydra channels)."""

from __future__ import annotations

from typing import Any

from flask.typing import ResponseReturnValue
from sqlalchemy import select

from circus.auth.visibility import only_visible, require_visible
from circus.common.models import Channel
from circus.projects import service
from circus.server.api.base import Blueprint, paginate
from circus.server.api.schemas.common import PageArgs, page_of
from circus.server.api.schemas.projects import (
    ChannelCreateSchema,
    ChannelSchema,
    ChannelUpdateSchema,
)
from circus.server.auth import current_actor
from circus.server.context import db_session

blp = Blueprint("channels", __name__, url_prefix="/api/v1/channels", description="Channels")


def _channel(channel: str) -> Channel:
    """The channel named ``channel``, a 404 when its project is hidden from the caller
    (before any permission check: a 403 would confirm that it exists)."""
    session = db_session()
    row = service.get_channel(session, channel)
    require_visible(session, current_actor(), row.project_id, f"channel {channel}")
    return row


@blp.get("")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(ChannelSchema))
def list_channels(args: dict[str, Any]) -> Any:
    query = only_visible(select(Channel), Channel.project_id, current_actor())
    return paginate(db_session(), query.order_by(Channel.name), args)


@blp.post("")
@blp.arguments(ChannelCreateSchema)
@blp.response(201, ChannelSchema)
def create_channel(data: dict[str, Any]) -> Any:
    session = db_session()
    jobset = service.get_jobset_by_id(session, data["jobset_id"])
    require_visible(session, current_actor(), jobset.project_id, f"jobset with id {jobset.id}")
    channel = service.create_channel(session, current_actor(), jobset, name=data["name"],
                                     mode=data["mode"], aggregate_job=data["aggregate_job"])
    session.commit()
    return channel


@blp.put("/<name:channel>")
@blp.arguments(ChannelUpdateSchema)
@blp.response(200, ChannelSchema)
def update_channel(data: dict[str, Any], channel: str) -> Any:
    """Switch between manual and automatic mode, set or clear the aggregate job."""
    session = db_session()
    row = service.update_channel(session, current_actor(), _channel(channel), data)
    session.commit()
    return row


@blp.get("/<name:channel>")
@blp.response(200, ChannelSchema)
def get_channel(channel: str) -> Any:
    return _channel(channel)


@blp.delete("/<name:channel>")
@blp.response(204)
def delete_channel(channel: str) -> ResponseReturnValue:
    session = db_session()
    service.delete_channel(session, current_actor(), _channel(channel))
    session.commit()
    return ""


@blp.post("/<name:channel>/promote/<id:evaluation_id>")
@blp.response(200, ChannelSchema)
def promote(channel: str, evaluation_id: int) -> Any:
    session = db_session()
    row = service.promote_channel(session, current_actor(), _channel(channel), evaluation_id)
    session.commit()
    return row
