"""Inbound webhook answers."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields


class TriggeredSchema(ma.Schema):
    jobset = fields.String(required=True)
    jobset_id = fields.Integer(required=True)
    evaluation_id = fields.Integer(allow_none=True, metadata={
        "description": "the evaluation created (or the jobset's pending/running one)"})
    created = fields.Boolean(required=True)
    message = fields.String(required=True)


class WebhookReceivedSchema(ma.Schema):
    event = fields.String(required=True, metadata={"description": "the forge's event name"})
    action = fields.String(required=True, metadata={
        "description": "triggered, ignored, pong, or duplicate (a delivery id already "
        "received: nothing done)"})
    message = fields.String(required=True)
    evaluations = fields.List(fields.Nested(TriggeredSchema), required=True)
