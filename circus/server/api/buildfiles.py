"""/api/v1/builds/{id}/log, log/stream (SSE), products and their download."""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Response, send_file, stream_with_context
from sqlalchemy import select

from circus.common.enums import StepState
from circus.common.errors import InvalidInput, NotFound, PermissionDenied
from circus.common.models import BuildOutput, BuildProduct, BuildStep, Step
from circus.server import logfiles, streams
from circus.server.api.base import Blueprint
from circus.server.api.queries import get_build
from circus.server.api.schemas.builds import DownloadArgsSchema, LogArgsSchema, ProductSchema
from circus.server.auth import current_actor
from circus.server.context import db_session, server_context, settings
from circus.server.security import build_output, client_address

blp = Blueprint("build-files", __name__, url_prefix="/api/v1/builds",
                description="Build logs and products")

B = "/<id:build_id>"
STORE_DIR = "/nix/store"


def _log_step_id(build_id: int, step_id: int | None) -> int:
    session = db_session()
    get_build(session, build_id, current_actor())
    query = select(BuildStep.step_id).where(BuildStep.build_id == build_id)
    query = (query.where(BuildStep.step_id == step_id) if step_id is not None
             else query.where(BuildStep.is_toplevel.is_(True)))
    found = session.scalar(query.limit(1))
    if found is None:
        raise NotFound(f"build {build_id} has no such step" if step_id is not None
                       else f"build {build_id} has no log (it built nothing itself)")
    return found


def _locate(step_id: int) -> tuple[Path | None, bool]:
    """The step's current log file and whether it is done, from a short-lived session."""
    with server_context().session_factory() as session:
        step = session.get(Step, step_id)
        if step is None:
            return None, True
        return (logfiles.step_log(settings().logs.log_dir, step.log_path, step.drv_path,
                                  step.id), step.state is StepState.done)


_TEXT = {"text/plain": {"schema": {"type": "string"}}}


@blp.get(B + "/log")
@blp.arguments(LogArgsSchema, location="query")
@blp.doc(responses={"200": {"description": "the whole log, decompressed", "content": _TEXT}})
@build_output()
def log(args: dict[str, Any], build_id: int) -> Response:
    step_id = _log_step_id(build_id, args.get("step"))
    path, _ = _locate(step_id)
    if path is None:
        raise NotFound(f"no log file for build {build_id}")
    return Response(logfiles.read_chunks(path), mimetype="text/plain",
                    headers={"Cache-Control": "no-store"})


def sse_events(chunks: Iterator[bytes], final: Any) -> Iterator[str]:
    """Server-sent events: one ``data:`` per log line, then ``event: end``."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            yield "".join(f"data: {line.decode(errors='replace').rstrip(chr(13))}\n\n"
                          for line in lines)
        else:
            # keep proxies and clients from timing out on a quiet build
            yield ": keep-alive\n\n"
    if pending:
        yield f"data: {pending.decode(errors='replace')}\n\n"
    yield f"event: end\ndata: {final()}\n\n"


@blp.get(B + "/log/stream")
@blp.arguments(LogArgsSchema, location="query")
@blp.doc(responses={"200": {"description": "server-sent events: log lines as they are "
                            "written, then an `end` event with the step status",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
@build_output()
def log_stream(args: dict[str, Any], build_id: int) -> Response:
    step_id = _log_step_id(build_id, args.get("step"))
    timeout = float(settings().server.request_timeout) * 60

    def final() -> str:
        with server_context().session_factory() as session:
            step = session.get(Step, step_id)
            return step.status.name if step is not None and step.status is not None else "unknown"

    # release the request's connection: the stream may last as long as the build
    db_session().close()
    return streams.capped(client_address(), lambda: Response(
        stream_with_context(sse_events(logfiles.follow(lambda: _locate(step_id),
                                                       timeout=timeout), final)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}))


# ---------------------------------------------------------------------------
# products


@blp.get(B + "/products")
@blp.response(200, ProductSchema(many=True))
def products(build_id: int) -> Any:
    session = db_session()
    get_build(session, build_id, current_actor())
    return list(session.scalars(select(BuildProduct).where(BuildProduct.build_id == build_id)
                                .order_by(BuildProduct.id)))


def product_file(product: BuildProduct, outputs: list[str], sub: str | None) -> Path:
    """The file to send, proven to lie inside one of the build's outputs.

    Product paths come from the build's own ``hydra-build-products`` file and
    ``sub`` from the client: both are untrusted, so the real path (symlinks
    resolved) must stay inside an output.
    """
    path = product.path
    if product.is_directory:
        sub = sub if sub is not None else (product.default_path or "")
        if not sub:
            raise InvalidInput("this product is a directory", {"path": ["name a file in it"]})
        if "\x00" in sub or os.path.isabs(sub) or ".." in Path(sub).parts:
            raise InvalidInput("invalid path", {"path": ["must be relative, without '..'"]})
        path = os.path.join(path, sub)
    real = os.path.realpath(path)
    roots = [os.path.realpath(o) for o in outputs if o.startswith(STORE_DIR + "/")]
    if not any(real == root or real.startswith(root + "/") for root in roots):
        raise PermissionDenied("product path is outside the build's outputs")
    if not os.path.isfile(real):
        raise NotFound("product file does not exist (garbage-collected?)")
    return Path(real)


@blp.get(B + "/products/<id:product_id>/download")
@blp.arguments(DownloadArgsSchema, location="query")
@blp.doc(responses={"200": {"description": "the product file",
                            "content": {"application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}}}}})
@build_output(attachment=True)
def download(args: dict[str, Any], build_id: int, product_id: int) -> Response:
    session = db_session()
    get_build(session, build_id, current_actor())
    product = session.get(BuildProduct, product_id)
    if product is None or product.build_id != build_id:
        raise NotFound(f"build {build_id} has no product {product_id}")
    outputs = list(session.scalars(select(BuildOutput.path).where(
        BuildOutput.build_id == build_id)))
    path = product_file(product, outputs, args.get("path"))
    mimetype = (product.content_type if not product.is_directory else None) or \
        mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # API clients save products; the dashboard's download shows them inline (sandboxed)
    return send_file(path, mimetype=mimetype, download_name=path.name, conditional=True,
                     as_attachment=True)
