"""Publishing a finished build's outputs into the binary cache.

(Contract stub: the binary-cache work fills this in. The queue runner calls it
in the worker, after the outputs are valid and before the build is marked
finished, so ``fail_build_on_upload_error`` can fail the build.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from circus.common.config import Settings


class UploadError(Exception):
    """Uploading to the configured remote store failed after all retries."""


@dataclass
class PublishResult:
    #: store paths recorded in narinfo_cache (outputs and, as needed, their closure)
    published: list[str] = field(default_factory=list)
    signed: bool = False


def publish_outputs(session: Session, settings: Settings, build_id: int) -> PublishResult:
    """Record (compress, sign, upload) the outputs of a succeeded build.

    Idempotent. Raises :class:`UploadError` only when an S3 upload failed.
    """
    return PublishResult()
