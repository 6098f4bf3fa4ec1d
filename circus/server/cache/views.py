"""``/nix-cache`` and ``/projects/<name>/nix-cache``: a Nix binary cache over HTTP.

Every user-supplied part of a URL is checked against a strict pattern before
anything else happens; only names Circus itself produced ever reach the
database or the filesystem, and a NAR file is opened only after the database
confirmed that this cache serves it.

The cache of a hidden project is private: it answers only callers who may see
the project (an API key as ``Authorization: Bearer`` or as the password of HTTP
Basic credentials, which is what Nix sends from a ``netrc-file``), with
``Cache-Control: private``; anonymous callers get the same 401 for a project that does
not exist, so the answer never tells the two apart. The shared ``/nix-cache`` does not
serve paths that only hidden projects built.

A remote build worker (``circus-worker``) substitutes its steps' inputs from the
shared ``/nix-cache`` with its name and token as netrc (Basic) credentials. Those
open, beyond what everyone gets, exactly the input closures of the steps it holds
at that moment (hidden projects' paths and the ``worker_only`` .drv files and
sources included), with ``Cache-Control: private``; a worker token is not an API
key and opens no per-project cache.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re

from flask import Blueprint, Response, abort, current_app, redirect, request, send_file
from flask.typing import ResponseReturnValue

from circus.auth import api_keys
from circus.auth.actor import Actor
from circus.auth.visibility import require_visible
from circus.cache.files import NAR_URL, LocalFiles
from circus.cache.s3 import S3Error, S3Store
from circus.common.errors import InvalidInput, NotFound, Unavailable
from circus.common.nix import storepath
from circus.common.nix.narinfo import CONTENT_TYPE, cache_info
from circus.common.tokens import token_accepted
from circus.remote_workers.service import RemoteWorker, RemoteWorkers, authenticate
from circus.server.auth import current_actor
from circus.server.cache.lookup import CacheIndex
from circus.server.context import db_session, server_context, settings
from circus.server.counters import count_cache_error, count_cache_request, tally
from circus.server.security import build_output, client_address

log = logging.getLogger(__name__)

blueprint = Blueprint("cache", __name__)

PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAR_TYPE = "application/x-nix-nar"
#: NAR files are content-addressed: a name never changes meaning
NAR_CACHE_CONTROL = "public, max-age=31536000, immutable"
S3_OR_CONFIG_ERRORS: tuple[type[Exception], ...] = (*S3Error, ValueError)


def index() -> CacheIndex:
    found: CacheIndex = current_app.extensions["circus_cache"]
    return found


def _project(name: str | None) -> tuple[str | None, bool]:
    """The project of a per-project cache URL (checked) and whether its cache is private."""
    if name is None:
        return None, False
    if PROJECT_NAME.fullmatch(name) is None:
        raise NotFound("no such project cache")
    found = index().project(name)
    if found is None or found[1]:
        # a missing project asks anonymous callers for credentials just like a hidden one
        # does: a 404 here would tell them which of the two a name is
        actor = _caller()
        if not actor.is_authenticated:
            body = json.dumps({"error": "this project's cache needs credentials",
                               "details": {"hint": "an API key as the password of a netrc "
                                                   "entry, or Authorization: Bearer"}})
            abort(Response(body, 401, mimetype="application/json", headers={
                "WWW-Authenticate": 'Basic realm="Circus binary cache"'}))
        if found is None:
            raise NotFound("no such project cache")
        require_visible(db_session(), actor, found[0], "project cache")
    return name, found[1]


def _basic_credentials() -> tuple[str, str] | None:
    """(user, password) of the request's Basic credentials (Nix's netrc), None without
    them; 400 when they are malformed."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode(
        ).partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidInput("malformed Basic credentials") from None
    return user, password


def _caller() -> Actor:
    """Who is asking: an API key as Basic password (Nix's netrc), else as the API does."""
    credentials = _basic_credentials()
    if credentials is None:
        return current_actor()
    found = api_keys.authenticate(db_session(), credentials[1], client_address())
    if found is None:
        abort(Response(json.dumps({"error": "invalid or revoked API key", "details": None}),
                       401, mimetype="application/json",
                       headers={"WWW-Authenticate": 'Basic realm="Circus binary cache"'}))
    return found


def _worker() -> RemoteWorker | None:
    """The remote worker whose netrc credentials (its name and token as Basic user and
    password) the request carries, or None (anonymous or anything else)."""
    config = settings()
    credentials = _basic_credentials() if config.remote_workers.enabled else None
    if credentials is None:
        return None
    name, token = credentials
    if not token_accepted(token, config.remote_workers.auth_tokens):
        return None
    return authenticate(config, token, name)


def _fetchable_by_worker(paths: set[str]) -> bool:
    """Whether the calling worker holds a step whose input closure has one of ``paths``."""
    worker = _worker()
    if worker is None:
        return False
    context = server_context()
    allowed = RemoteWorkers(context.settings, context.session_factory).fetchable(worker)
    if paths.isdisjoint(allowed):
        log.warning("cache: remote worker %s asked for %s, in no step it holds", worker.name,
                    sorted(paths)[0])
        return False
    return True


#: what a hidden project's cache answers with: only the asking client may keep it, never a
#: shared proxy or CDN (it would serve the private path to everyone after)
PRIVATE_CACHE_CONTROL = "private, no-store"


def narinfo_response(body: bytes, private: bool = False) -> Response:
    response = Response(body, mimetype=CONTENT_TYPE)
    response.headers["Cache-Control"] = PRIVATE_CACHE_CONTROL if private else \
        f"public, max-age={settings().cache.narinfo_cache_ttl_secs}"
    return response


@blueprint.get("/nix-cache/nix-cache-info")
@blueprint.get("/projects/<project>/nix-cache/nix-cache-info")
def nix_cache_info(project: str | None = None) -> ResponseReturnValue:
    private = _project(project)[1]
    response = Response(cache_info(settings().cache.priority), mimetype="text/x-nix-cache-info")
    if private:
        response.headers["Cache-Control"] = PRIVATE_CACHE_CONTROL
    return response


@blueprint.get("/nix-cache/<name>.narinfo")
@blueprint.get("/projects/<project>/nix-cache/<name>.narinfo")
def narinfo(name: str, project: str | None = None) -> ResponseReturnValue:
    if not storepath.is_hash_part(name):
        raise InvalidInput("malformed store path hash", {"hash": name[:64]})
    project_name, private = _project(project)
    body = index().narinfo(name, project_name, remember=not private)
    if body is None and project_name is None and request.authorization is not None:
        found = index().any_narinfo(name)
        if found is not None and _fetchable_by_worker({found[0]}):
            body, private = found[1], True
    count_cache_request(tally(), "narinfo", hit=body is not None,
                        sent=len(body) if body is not None and request.method == "GET" else 0)
    if body is None:
        raise NotFound("no such path in this cache")
    return narinfo_response(body, private)


@blueprint.get("/nix-cache/nar/<name>")
@blueprint.get("/projects/<project>/nix-cache/nar/<name>")
@build_output()
def nar(name: str, project: str | None = None) -> ResponseReturnValue:
    url = f"nar/{name}"
    if NAR_URL.fullmatch(url) is None:
        raise InvalidInput("malformed NAR file name", {"name": name[:80]})
    project_name, private = _project(project)
    location = index().nar(url, project_name)
    if location is None and project_name is None and request.authorization is not None:
        found = index().any_nar(url)
        if found is not None and _fetchable_by_worker(found[1]):
            location, private = found[0], True
    counts = tally()
    if location is None:
        count_cache_request(counts, "nar", hit=False)
        raise NotFound("no such NAR in this cache")
    config = settings()
    if "local" in location.storages:
        path = LocalFiles(config.cache.cache_dir).path_of(url)
        if path is not None and path.is_file():
            response = send_file(path, mimetype=NAR_TYPE, conditional=True, etag=False,
                                 max_age=None)
            response.headers["Cache-Control"] = PRIVATE_CACHE_CONTROL if private \
                else NAR_CACHE_CONTROL
            count_cache_request(counts, "nar", hit=True,
                                sent=(response.content_length or 0)
                                if request.method == "GET" else 0)
            return response
        if location.storages == {"local"}:
            log.error("cache: %s is recorded but missing from %s", url, config.cache.cache_dir)
            count_cache_error(counts, "missing_file")
            raise NotFound("no such NAR in this cache")
    if not config.cache_upload.store_uri:
        count_cache_error(counts, "no_s3_config")
        raise Unavailable("this NAR is stored in S3, but no cache_upload.store_uri is set")
    try:
        target = S3Store(config.cache_upload).presigned_get(
            url, config.cache_upload.presign_expiry_secs)
    except S3_OR_CONFIG_ERRORS as exc:
        log.error("cache: cannot presign %s: %s", url, exc)
        count_cache_error(counts, "s3")
        raise Unavailable("cannot reach the S3 cache right now") from None
    # S3 sends the bytes: a hit, but none of them count as served by this server
    count_cache_request(counts, "nar", hit=True)
    moved = redirect(target, code=302)
    moved.headers["Cache-Control"] = "no-store"
    return moved
