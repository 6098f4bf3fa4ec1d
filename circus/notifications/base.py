"""What every notification target shares: events, the interface, errors, HTTP, repositories.

A target (one module per kind: github, gitea, gitlab, webhook, slack, email)
turns one *delivery* — a build event snapshot plus the project's notification
config — into one request to the outside world. Targets never touch the
database; :mod:`circus.notifications.service` does (claim, back-off, outcome).
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from circus.common import outbound, repository
from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.common.repository import Repository, RepositoryUrlError


class Event(StrEnum):
    """What happened to the build (the payload's ``event``)."""

    #: the queue runner computed its steps: it waits for a builder
    queued = "queued"
    #: one of its steps started
    started = "started"
    #: it reached a final status (``payload.build.status``)
    finished = "finished"

    @classmethod
    def of(cls, status: BuildStatus) -> Event:
        if status is BuildStatus.pending:
            return cls.queued
        if status is BuildStatus.running:
            return cls.started
        return cls.finished


class DeliveryError(Exception):
    """A delivery failed. ``permanent``: retrying cannot help (bad config, 4xx answer)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Delivery:
    """One notification to send: the event snapshot and the config it goes to."""

    settings: Settings
    #: the ``notification_configs`` row's JSON (may carry tokens: never log it)
    config: Mapping[str, Any]
    #: the event snapshot made by the collector (see ``service.build_payload``)
    payload: Mapping[str, Any]
    #: whether ``*_file`` keys may be read: only for configs an admin wrote on the
    #: server side (declarative config), never for ones made through the API
    files_allowed: bool = True

    @property
    def event(self) -> Event:
        return Event(self.payload["event"])

    @property
    def build(self) -> Mapping[str, Any]:
        build: Mapping[str, Any] = self.payload["build"]
        return build

    @property
    def status(self) -> BuildStatus:
        return BuildStatus(int(self.build["status_code"]))

    @property
    def commit(self) -> str:
        commit = self.payload.get("commit")
        if not commit:
            raise DeliveryError("the evaluation recorded no commit hash", permanent=True)
        return str(commit)

    @property
    def target_url(self) -> str:
        return str(self.build["url"])

    @property
    def context(self) -> str:
        """The status check's name: ``circus/<project>/<jobset>/<job>`` (prefix configurable)."""
        prefix = str(self.config.get("context") or "circus")
        payload = self.payload
        return f"{prefix}/{payload['project']}/{payload['jobset']}/{self.build['job_name']}"

    @property
    def description(self) -> str:
        return describe(self.event, self.status)

    def repository(self) -> Repository:
        """The config's ``repository`` (``owner/name`` or a URL), else the project's URL."""
        configured = self.config.get("repository")
        if configured:
            text = str(configured)
            if "://" not in text and not text.startswith("git@") and ":" not in text:
                return Repository(None, None, text.strip("/"))
            return parse_repository(text)
        url = self.payload.get("repository_url") or ""
        if not url:
            raise DeliveryError("the project has no repository_url and the config names no "
                                "repository", permanent=True)
        return parse_repository(str(url))

    def secret(self, key: str, default: str | None) -> str | None:
        """A config secret (``key`` or ``<key>_file``), else ``default`` (the global one)."""
        value = self.config.get(key)
        if value:
            return str(value)
        path = self.config.get(f"{key}_file")
        if path:
            if not self.files_allowed:
                raise DeliveryError(f"{key}_file is only allowed in server-side (declarative) "
                                    "configs", permanent=True)
            try:
                return Path(str(path)).read_text().strip()
            except OSError as exc:
                raise DeliveryError(f"cannot read {key}_file: {exc.strerror}",
                                    permanent=True) from None
        return default


    def forge_token(self, label: str, url: str, default_url: str | None,
                    global_token: str | None) -> str:
        """The token for a forge request to ``url``: the config's own, else the server's
        ``global_token`` — but that one only when ``url`` is the server's configured
        ``default_url`` for this forge, never a URL the project chose."""
        own = self.secret("token", None)
        if own:
            return own
        if global_token and default_url and same_base(url, default_url):
            return global_token
        if global_token:
            raise DeliveryError(
                f"the server's {label} token is only sent to its configured URL "
                f"({default_url or 'none configured'}); a config with another URL must "
                "give its own token", permanent=True)
        raise DeliveryError(f"no {label} token (notifications settings or the config's "
                            "token)", permanent=True)


def same_base(url: str, base: str) -> bool:
    """Whether two base URLs name the same place (scheme, host, port and path)."""
    def normal(value: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(value.strip())
        scheme = parts.scheme.lower()
        try:
            port = parts.port or {"http": 80, "https": 443}.get(scheme)
        except ValueError:
            port = -1
        return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")

    return normal(url) == normal(base)


def file_key_problems(config: Mapping[str, Any]) -> list[str]:
    """``*_file`` keys read files of the server: not for configs made through the API."""
    return [f"{key}: names a file on the server, which only server-side (declarative) "
            f"configs may do; give the value itself ({key.removesuffix('_file')})"
            for key in sorted(config) if key.endswith("_file")]


class Target(Protocol):
    """A kind of notification (one per :class:`NotificationType`)."""

    type: NotificationType
    #: a newer event replaces an older one (commit statuses): stale tasks are skipped
    #: and deliveries for one (build, config) never overlap
    supersedes: bool

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        """What is wrong with a config (checked when it is created through the API)."""
        ...

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        """Whether this event is worth a notification (filters such as on_failure_only)."""
        ...

    def deliver(self, delivery: Delivery) -> None:
        """Send it; raise :class:`DeliveryError` on failure."""
        ...


# ---------------------------------------------------------------------------
# statuses


def describe(event: Event, status: BuildStatus) -> str:
    if event is Event.queued:
        return "queued"
    if event is Event.started:
        return "building"
    return {
        BuildStatus.succeeded: "build succeeded",
        BuildStatus.failed: "build failed",
        BuildStatus.dependency_failed: "a dependency failed to build",
        BuildStatus.aborted: "build aborted",
        BuildStatus.cancelled: "build cancelled",
        BuildStatus.failed_with_output: "build failed (with output)",
        BuildStatus.timeout: "build timed out",
        BuildStatus.cached_failure: "build failed (cached failure)",
        BuildStatus.unsupported_system: "no builder supports this system",
        BuildStatus.log_limit_exceeded: "build log limit exceeded",
        BuildStatus.nar_size_limit_exceeded: "output size limit exceeded",
        BuildStatus.non_deterministic: "build is not deterministic",
        BuildStatus.oom_killed: "build was killed (out of memory)",
    }.get(status, status.name)


def is_infrastructure(status: BuildStatus) -> bool:
    """Outcomes that say nothing about the code (forges call these ``error``)."""
    return status in (BuildStatus.aborted, BuildStatus.cancelled,
                      BuildStatus.unsupported_system)


def commit_state(event: Event, status: BuildStatus) -> str:
    """GitHub, Gitea and Forgejo states: pending, success, failure, error."""
    if event is not Event.finished:
        return "pending"
    if status is BuildStatus.succeeded:
        return "success"
    return "error" if is_infrastructure(status) else "failure"


def is_failure(status: BuildStatus) -> bool:
    return status.is_finished and status is not BuildStatus.succeeded


def flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    return default if value is None else bool(value)


# ---------------------------------------------------------------------------
# config checks


def url_problem(config: Mapping[str, Any], key: str, *, required: bool = False) -> list[str]:
    value = config.get(key)
    if value is None:
        return [f"{key} is required"] if required else []
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https") \
            or not urlsplit(value).netloc:
        return [f"{key} must be an http(s) URL"]
    return []


def string_problem(config: Mapping[str, Any], *keys: str) -> list[str]:
    return [f"{key} must be a string" for key in keys
            if key in config and not isinstance(config[key], str)]


def bool_problem(config: Mapping[str, Any], *keys: str) -> list[str]:
    return [f"{key} must be true or false" for key in keys
            if key in config and not isinstance(config[key], bool)]


# ---------------------------------------------------------------------------
# repositories


def parse_repository(url: str) -> Repository:
    """:func:`circus.common.repository.parse_repository`, failing as a permanent
    delivery error (no retry can fix a URL)."""
    try:
        return repository.parse_repository(url)
    except RepositoryUrlError as exc:
        raise DeliveryError(str(exc), permanent=True) from None


# ---------------------------------------------------------------------------
# HTTP

#: answers worth retrying even though they are 4xx
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def post(label: str, url: str, *, settings: Settings, json: Any = None,
         data: bytes | None = None, headers: Mapping[str, str] | None = None
         ) -> outbound.Response:
    """POST through the guarded client and raise :class:`DeliveryError` unless the answer
    is 2xx. Destinations that are not public addresses are refused (permanently) unless
    ``server.outbound_allowlist`` names them; redirects are not followed.

    Errors name ``label`` and the host, never the URL: webhook URLs (Slack's) are
    secrets themselves, and tokens travel in headers that are never echoed.
    """
    host = urlsplit(url).netloc.rpartition("@")[2]
    send = dict(headers or {})
    if json is not None:
        data = jsonlib.dumps(json).encode()
        send.setdefault("Content-Type", "application/json")
    timeout = settings.notifications.http_timeout
    try:
        response = outbound.post(url, allowlist=outbound.Allowlist.parse(
            settings.server.outbound_allowlist), timeout=timeout, body=data or b"",
            headers=send)
    except outbound.OutboundError as exc:
        if exc.timeout:
            raise DeliveryError(f"{label} ({host}): no answer within {timeout} s") from None
        if exc.refused:
            raise DeliveryError(f"{label} ({host}): {exc}", permanent=True) from None
        raise DeliveryError(f"{label} ({host}): {exc}") from None
    status = response.status
    if 200 <= status < 300:
        return response
    if 300 <= status < 400:
        raise DeliveryError(f"{label} ({host}) answered {status}: redirects are not followed",
                            permanent=True)
    # admins see this (the notification tasks are theirs only); nobody else does
    body = response.text[:300].strip().replace("\n", " ")
    message = f"{label} ({host}) answered {status}: {body}"
    # GitHub's rate limits are 403s with a Retry-After or an exhausted quota
    rate_limited = status == 403 and (response.headers.get("Retry-After") is not None or
                                      response.headers.get("X-RateLimit-Remaining") == "0")
    permanent = 400 <= status < 500 and status not in RETRYABLE_4XX and not rate_limited
    raise DeliveryError(message, permanent=permanent)
