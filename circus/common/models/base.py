"""Declarative base, reusable column types and enum columns."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    Identity,
    MetaData,
    SmallInteger,
    Text,
    func,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[str]: ARRAY(Text),
        str: Text,
        int: BigInteger,
    }


def utcnow() -> datetime:
    return datetime.now(UTC)


IntPK = Annotated[int, mapped_column(BigInteger, Identity(), primary_key=True)]
CreatedAt = Annotated[datetime, mapped_column(server_default=func.now(), default=utcnow)]
UpdatedAt = Annotated[
    datetime, mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)
]
BoolTrue = Annotated[bool, mapped_column(server_default=true(), default=True)]
BoolFalse = Annotated[bool, mapped_column(server_default="false", default=False)]
TextList = Annotated[list[str], mapped_column(ARRAY(Text), server_default="{}", default=list)]
JsonDict = Annotated[dict[str, Any], mapped_column(JSONB, server_default="{}", default=dict)]

E = TypeVar("E", bound=enum.Enum)


def enum_column(enum_cls: type[enum.Enum], name: str) -> Enum:
    """A text column with a CHECK constraint, storing the enum's *value*."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda cls: [member.value for member in cls],
        validate_strings=True,
    )


class IntEnumColumn(TypeDecorator[Any]):
    """Stores an ``IntEnum`` by its code (Hydra-compatible build status codes)."""

    impl = SmallInteger
    cache_ok = True

    def __init__(self, enum_cls: type[enum.IntEnum]) -> None:
        super().__init__()
        self.enum_cls = enum_cls
        # a dict lookup per value read, where calling the enum took three Python calls
        # (a job matrix reads 500 statuses a page)
        self._by_code: dict[int, enum.IntEnum] = {member.value: member for member in enum_cls}

    def process_bind_param(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return int(self.enum_cls(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        member = self._by_code.get(value)
        return member if member is not None else self.enum_cls(value)
