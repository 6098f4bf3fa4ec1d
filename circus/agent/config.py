"""The agent's own configuration file (SPEC §11, ``[agent]`` and ``[tracing]``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator

from circus.common.configbase import (
    Problem,
    SettingsModel,
    at_least,
    load_host_program_settings,
)
from circus.common.logging import TracingSettings
from circus.common.nix.environment import DEFAULT_SANDBOX_PATHS, sandbox_path_problem

Positive = Annotated[int, AfterValidator(at_least(1))]
NonNegative = Annotated[int, AfterValidator(at_least(0))]


class AgentTlsSettings(SettingsModel):
    #: CA bundle to verify the gateway's certificate (default: system CAs)
    ca_file: str | None = None
    #: client certificate for mTLS
    cert_file: str | None = None
    key_file: str | None = None
    #: expected server name (default: the runner_url host)
    server_name: str | None = None

    def problems(self) -> list[Problem]:
        found = []
        if bool(self.cert_file) != bool(self.key_file):
            found.append(Problem("cert_file", "cert_file and key_file must be set together"))
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                found.append(Problem(key, f"file does not exist: {value}"))
        return found


class AgentEphemeralSettings(SettingsModel):
    enabled: bool = False
    #: stop after this many builds (0: no limit)
    max_builds: NonNegative = 0
    max_idle_secs: NonNegative = 120
    #: stop after this long (0: no limit)
    max_lifetime_secs: NonNegative = 0


class AgentSection(SettingsModel):
    secret_fields = ("auth_token",)

    name: str | None = None
    #: ``tls://host:port`` or, when the gateway allows it, ``tcp://host:port``
    runner_url: str
    auth_token: str | None = None
    #: instead of ``auth_token``: present a GitHub Actions ID token for this audience
    #: (the gateway's ``queue_runner.rpc.oidc.audiences``)
    oidc_audience: str | None = None
    systems: list[str] | None = None
    features: list[str] = []
    mandatory_features: list[str] = []
    max_jobs: Positive = 1
    #: cores per build (``--cores``); 0 = all
    cores: NonNegative = 0
    speed_factor: Annotated[float, AfterValidator(at_least(0.001))] = 1.0
    reconnect_delay_secs: Annotated[float, AfterValidator(at_least(0.1))] = 5.0
    heartbeat_interval_secs: Annotated[float, AfterValidator(at_least(0.1))] = 10.0
    #: a heartbeat unanswered this long means the connection is dead (a cut network
    #: never closes it): the agent stops its builds and dials again
    heartbeat_timeout_secs: Annotated[float, AfterValidator(at_least(0.1))] = 30.0
    work_dir: str = "/var/lib/circus-agent"
    machine_id_file: str | None = None
    max_log_size: Positive = 64 * 1024 * 1024
    #: binary caches the agent's Nix may substitute from. Default: none, whatever
    #: nix.conf says: inputs come from the runner, and an agent without Internet access
    #: would otherwise spend seconds per step retrying cache.nixos.org. List the
    #: runner's cache (``https://ci.example.org/nix-cache``, with its key in
    #: ``trusted_public_keys``) or others to use them; unset (``null`` via the
    #: environment) keeps nix.conf's
    substituters: list[str] | None = []
    trusted_public_keys: list[str] | None = None
    #: extra nix.conf settings for every Nix call of the agent (``NIX_CONFIG``)
    nix_config: dict[str, str] = {}
    #: builds run in Nix's sandbox: no host files but the store and ``sandbox_paths``
    #: (read-only), no network; false only when every build is trusted code
    sandbox: bool = True
    sandbox_paths: list[str] = list(DEFAULT_SANDBOX_PATHS)
    tls: AgentTlsSettings = AgentTlsSettings()
    ephemeral: AgentEphemeralSettings = AgentEphemeralSettings()

    def problems(self) -> list[Problem]:
        found = []
        parts = urlsplit(self.runner_url)
        if parts.scheme not in ("tls", "tcp") or not parts.hostname or not parts.port:
            found.append(Problem("runner_url",
                                 f"must be tls://host:port or tcp://host:port "
                                 f"(got {self.runner_url!r})"))
        for i, entry in enumerate(self.sandbox_paths):
            problem = sandbox_path_problem(entry)
            if problem:
                found.append(Problem(f"sandbox_paths.{i}", problem))
        if not self.auth_token and not self.oidc_audience:
            found.append(Problem("auth_token",
                                 "is required (or auth_token_file, or oidc_audience)"))
        return found

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.runner_url).scheme == "tls"

    @property
    def host(self) -> str:
        return urlsplit(self.runner_url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.runner_url).port or 0


class AgentSettings(SettingsModel):
    agent: AgentSection
    #: the same section as the daemons' (level, format text|json)
    tracing: TracingSettings = TracingSettings()


def load_agent_settings(files: list[Path] | None = None,
                        environ: Mapping[str, str] | None = None,
                        overrides: Mapping[str, Any] | None = None) -> AgentSettings:
    """Defaults < the config file(s) < ``CIRCUS_AGENT__*`` variables < ``overrides``."""
    return load_host_program_settings(AgentSettings, "agent", files, environ, overrides)
