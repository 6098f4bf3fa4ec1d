"""Autogenerate hooks shared by ``alembic/env.py`` and ``circus-migrate check``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import SmallInteger

from circus.common.models.base import IntEnumColumn


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # build statuses are stored as their Hydra codes: a plain smallint in the schema
    if type_ == "type" and isinstance(obj, IntEnumColumn):
        return "sa.SmallInteger()"
    return False


def compare_type(ctx: Any, inspected: Any, metadata: Any, inspected_type: Any,
                 metadata_type: Any) -> bool | None:
    if isinstance(metadata_type, IntEnumColumn):
        return not isinstance(inspected_type, SmallInteger)
    return None
