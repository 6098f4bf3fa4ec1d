"""The remote worker's own configuration file (``[worker]``, ``[tracing]``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator

from circus.common.configbase import (
    Problem,
    SettingsModel,
    at_least,
    between,
    load_host_program_settings,
)
from circus.common.logging import TracingSettings
from circus.common.nix.environment import DEFAULT_SANDBOX_PATHS, sandbox_path_problem

Positive = Annotated[int, AfterValidator(at_least(1))]
#: a Nix public key as nix.conf's ``trusted-public-keys`` takes it (ed25519: 32 bytes)
PUBLIC_KEY = re.compile(r"[A-Za-z0-9._-]+:[A-Za-z0-9+/]{43}=")
Seconds = Annotated[float, AfterValidator(at_least(0.1))]


class WorkerSection(SettingsModel):
    #: a broker URL may carry the broker's password: ``broker_url_file`` keeps it out of
    #: the config file (and out of the Nix store under services.circus-worker)
    secret_fields = ("token", "broker_url")

    #: unique per worker (two workers on one host need distinct names and work dirs);
    #: default: the host name
    name: str | None = None
    #: the circus-server the worker claims through (``https://ci.example.org``)
    server_url: str
    #: a token whose SHA-256 digest is in the server's ``remote_workers.auth_tokens``
    token: str | None = None
    #: the Celery broker the queue runner publishes wake-ups on (or ``broker_url_file``)
    broker_url: str
    systems: list[str] | None = None
    features: list[str] = []
    mandatory_features: list[str] = []
    #: builds at once (Celery pool threads)
    slots: Positive = 1
    #: steps one claim may take for one slot, built one after another with one input
    #: fetch, one output upload and one report (the server hands out no more than the
    #: worker's fair share of what is queued, so other workers are not left idle)
    batch_size: Annotated[int, AfterValidator(between(1, 64))] = 8
    #: cores per build (``--cores``); 0 = all
    cores: Annotated[int, AfterValidator(at_least(0))] = 0
    #: spools for input/output transfers
    work_dir: str = "/var/lib/circus-worker"
    #: seconds between heartbeats (and queue-class updates)
    heartbeat_secs: Seconds = 5.0
    #: verify the server's TLS certificate against this CA bundle (default: system CAs)
    ca_file: str | None = None
    request_timeout_secs: Seconds = 60.0
    #: pin the server's cache signing key (``name:base64``, its
    #: ``circus-admin``/``/nix-cache`` public key): the worker then trusts inputs signed
    #: by this key only and refuses to start when the server announces another one.
    #: Unset, it trusts the key the server announces over its (TLS) connection.
    cache_public_key: str | None = None

    def problems(self) -> list[Problem]:
        found = []
        if self.cache_public_key is not None and not PUBLIC_KEY.fullmatch(self.cache_public_key):
            found.append(Problem("cache_public_key", "must be a Nix public key name:base64 "
                                                     f"(got {self.cache_public_key!r})"))
        if urlsplit(self.server_url).scheme not in ("http", "https"):
            found.append(Problem("server_url", f"must be an http(s) URL (got "
                                               f"{self.server_url!r})"))
        if not self.token:
            found.append(Problem("token", "is required (or token_file)"))
        return found


class WorkerNixSection(SettingsModel):
    """Nix on the worker host (its own store)."""

    #: binary caches Nix may use here (unset: nix.conf's; empty: none). Inputs come
    #: from the server either way.
    substituters: list[str] | None = None
    trusted_public_keys: list[str] | None = None
    #: extra nix.conf settings for every Nix call (``NIX_CONFIG``)
    config: dict[str, str] = {}
    sandbox: bool = True
    sandbox_paths: list[str] = list(DEFAULT_SANDBOX_PATHS)

    def problems(self) -> list[Problem]:
        return [Problem(f"sandbox_paths.{i}", problem)
                for i, entry in enumerate(self.sandbox_paths)
                if (problem := sandbox_path_problem(entry))]


class WorkerSettings(SettingsModel):
    worker: WorkerSection
    nix: WorkerNixSection = WorkerNixSection()
    tracing: TracingSettings = TracingSettings()


def load_worker_settings(files: list[Path] | None = None,
                         environ: Mapping[str, str] | None = None,
                         overrides: Mapping[str, Any] | None = None) -> WorkerSettings:
    """Defaults < the config file(s) < ``CIRCUS_WORKER__*`` variables < ``overrides``."""
    return load_host_program_settings(WorkerSettings, "worker", files, environ, overrides)
