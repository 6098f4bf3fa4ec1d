"""What the binary cache serves."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from circus.common.enums import Compression
from circus.common.models.base import Base, BoolFalse, CreatedAt, TextList, enum_column


class NarInfo(Base):
    """One store path Circus serves, with its NAR and narinfo facts."""

    __tablename__ = "narinfo_cache"

    store_path: Mapped[str] = mapped_column(primary_key=True)
    #: the 32-character hash part clients ask for (``<hash>.narinfo``)
    hash_part: Mapped[str] = mapped_column(unique=True)
    nar_hash: Mapped[str]
    nar_size: Mapped[int]
    file_hash: Mapped[str | None]
    file_size: Mapped[int | None]
    compression: Mapped[Compression] = mapped_column(enum_column(Compression, "compression"))
    #: relative URL of the NAR (``nar/<filehash>.nar.zst``)
    url: Mapped[str] = mapped_column(index=True)
    #: where the file lives: ``local`` (cache_dir) or ``s3``
    storage: Mapped[str] = mapped_column(server_default="local", default="local")
    deriver: Mapped[str | None]
    references: Mapped[TextList]
    sig: Mapped[str | None]
    ca: Mapped[str | None]
    build_id: Mapped[int | None] = mapped_column(ForeignKey("builds.id", ondelete="SET NULL"),
                                                 index=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="SET NULL"),
                                                   index=True)
    #: published only as a remote worker's step input (``publish_paths``): served to
    #: workers holding such a step, to nobody else, until a build's outputs closure
    #: publishes it (which clears the mark)
    worker_only: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
    last_fetched_at: Mapped[datetime | None]


class NarInfoProject(Base):
    """Which projects' caches serve a path: every path of the closure of a project's builds.

    One path can belong to several projects (shared dependencies), so this is a
    link table rather than ``narinfo_cache.project_id`` (the first publisher).
    """

    __tablename__ = "narinfo_projects"

    store_path: Mapped[str] = mapped_column(
        ForeignKey("narinfo_cache.store_path", ondelete="CASCADE"), primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True, index=True)
