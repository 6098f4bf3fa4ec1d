"""Circus configuration: one TOML file for every daemon (SPEC §11).

``load_settings()`` is the only way to build a :class:`Settings`; nothing here
reads files or the environment at import time.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from circus.common.configbase import (
    ConfigError,
    Problem,
    SettingsModel,
    at_least,
    between,
    deep_merge,
    env_overrides,
    read_toml,
    validate_sections,
)
from circus.common.enums import (
    ChannelMode,
    Compression,
    ForgeType,
    InputType,
    JobsetState,
    MemberRole,
    NotificationType,
    PageAccess,
    Role,
    SchedulingStrategy,
    TriggerMode,
)
from circus.common.logging import TracingSettings
from circus.common.nix.environment import (
    DEFAULT_SANDBOX_PATHS,
    sandbox_options,
    sandbox_path_problem,
)
from circus.common.tokens import is_digest

__all__ = ["ConfigError", "Problem", "Settings", "load_settings"]

ENV_PREFIX = "CIRCUS_"

Positive = Annotated[int, AfterValidator(at_least(1))]
NonNegative = Annotated[int, AfterValidator(at_least(0))]
Percent = Annotated[float, AfterValidator(between(0, 100))]
Port = Annotated[int, AfterValidator(between(0, 65535))]


def _digest_of_line(line: str) -> str:
    """A digest line as ``sha256sum`` writes it (``<hex>  -`` or ``<hex> *file``) is
    its first word, so ``printf %s "$TOKEN" | sha256sum >> digests`` just works."""
    words = line.split()
    return words[0] if words else line


#: one accepted token's (agents, remote workers, scrapers) SHA-256 hex digest
TokenDigest = Annotated[str, AfterValidator(_digest_of_line)]


def digest_problems(digests: list[str], key: str = "auth_tokens") -> list[Problem]:
    """Every entry of a token-digest list that is not a SHA-256 hex digest."""
    return [Problem(f"{key}[{i}]", "must be a SHA-256 hex digest")
            for i, digest in enumerate(digests) if not is_digest(digest)]


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in schemes:
        return f"must be a URL with scheme {' or '.join(schemes)} (got {value!r})"
    if parts.scheme not in ("file", "unix", "redis+socket") and not parts.netloc and not parts.path:
        return f"URL has no host (got {value!r})"
    return None


# ---------------------------------------------------------------------------
# sections


class DatabaseSettings(SettingsModel):
    secret_fields = ("url",)

    url: str | None = None
    pool_size: Positive = 5
    max_overflow: NonNegative = 10
    pool_timeout: Positive = 30
    connect_timeout: Positive = 10
    statement_timeout_ms: NonNegative = 0

    def problems(self) -> list[Problem]:
        if self.url is None:
            return []
        problem = _url_problem(self.url, ("postgresql", "postgresql+psycopg2", "postgres"))
        return [Problem("url", problem)] if problem else []


class BrokerSettings(SettingsModel):
    secret_fields = ("url",)

    #: Celery broker; Redis by default, RabbitMQ (amqp://) works through kombu too
    url: str | None = None
    result_backend: str | None = None
    #: Celery task events from every worker and producer (for Flower's task list from
    #: the first task on); off, Flower turns them on in the workers it sees, seconds
    #: after each starts. Costs two broker messages per task.
    task_events: bool = False

    def problems(self) -> list[Problem]:
        if self.url is None:
            return []
        problem = _url_problem(self.url, ("redis", "rediss", "redis+socket", "amqp", "amqps",
                                          "pyamqp", "memory"))
        return [Problem("url", problem)] if problem else []


class LdapSettings(SettingsModel):
    secret_fields = ("bind_password",)

    enabled: bool = False
    uri: str = ""
    #: DN template, ``{username}`` is escaped against DN injection
    bind_dn_template: str = ""
    #: instead of the template: find the user's DN under this base with
    #: ``user_filter`` (as ``bind_dn``, or anonymously), then bind as it
    user_search_base: str | None = None
    #: ``{username}`` is escaped against filter injection
    user_filter: str = "(uid={username})"
    #: optional service account (with ``bind_password``) that reads a user's entry
    #: (mail, display name) after the user's own bind, for directories whose ACLs
    #: do not let users read their own entry
    bind_dn: str | None = None
    bind_password: str | None = None
    tls_ca_file: str | None = None
    start_tls: bool = False
    default_role: Role = Role.read_only
    timeout: Positive = 10
    #: group DN → role; the first group (in this order) the user belongs to decides
    #: the role at every login, no group → ``default_role``
    group_roles: dict[str, Role] = {}
    group_search_base: str | None = None
    #: ``{dn}`` is the user's entry DN, ``{username}`` the login name (both escaped)
    group_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={username}))"
    #: seconds between re-reads of every LDAP user's entry and groups (as ``bind_dn``,
    #: or anonymously): a role ``group_roles`` no longer grants is taken away, an entry
    #: gone from the directory disables the user, and their API keys follow at once
    #: (else only the user's next LDAP login would); 0: at login only
    sync_interval: NonNegative = 300

    def problems(self) -> list[Problem]:
        found = []
        if self.enabled:
            if self.group_roles and not self.group_search_base:
                found.append(Problem("group_search_base",
                                     "is required when group_roles is set"))
            problem = _url_problem(self.uri, ("ldap", "ldaps", "ldapi"))
            if problem:
                found.append(Problem("uri", problem))
            if self.user_search_base is None and "{username}" not in self.bind_dn_template:
                found.append(Problem("bind_dn_template",
                                     "must contain {username} (or set user_search_base)"))
            if self.user_search_base is not None and "{username}" not in self.user_filter:
                found.append(Problem("user_filter", "must contain {username}"))
            if self.bind_password and not self.bind_dn:
                found.append(Problem("bind_dn", "is required when bind_password is set"))
        return found


DEFAULT_PAGE_ACCESS: dict[str, PageAccess] = {
    "home": PageAccess.public,
    "projects": PageAccess.authenticated,
    "project": PageAccess.authenticated,
    "jobset": PageAccess.authenticated,
    "evaluation": PageAccess.authenticated,
    "build": PageAccess.authenticated,
    "channels": PageAccess.authenticated,
    "search": PageAccess.authenticated,
    "news": PageAccess.authenticated,
    "machines": PageAccess.authenticated,
    "queue": PageAccess.admin,
    "metrics": PageAccess.admin,
    #: ``/metrics``: queue, build and evaluation counts of the whole installation (hidden
    #: projects' included) and the agents' host names; scrapers may use ``metrics_tokens``
    "prometheus": PageAccess.admin,
    #: ``/health`` answers everyone its status (probes need it); who also sees the
    #: details: daemon hosts and versions, error texts, ``circus up``'s restarts
    "health_details": PageAccess.admin,
}


#: threads of each gunicorn worker (``circus-server``): one per request in flight
SERVER_THREADS = 32


class ServerSettings(SettingsModel):
    secret_fields = ("secret_key", "metrics_tokens")

    host: str = "127.0.0.1"
    port: Port = 3000
    #: public base URL (for links in notifications and the cache URL); derived when unset
    base_url: str | None = None
    #: signs session cookies and CSRF tokens; generated by ``circus up`` when unset
    secret_key: str | None = None
    request_timeout: Positive = 60
    max_body_size: Positive = 10 * 1024 * 1024
    allowed_origins: list[str] = []
    rate_limit_login: str = "10/minute"
    #: failed logins per account name, whatever address they come from (password
    #: spraying from many addresses); counted in the same storage as the other limits
    rate_limit_login_account: str = "30/hour"
    rate_limit_api: str = "1200/minute"
    rate_limit_enabled: bool = True
    #: where request counts live: unset = the broker's Redis (one budget across every
    #: server process and host), else ``memory://`` (per process) or a redis:// URL
    rate_limit_storage: str | None = None
    allowed_url_schemes: list[str] = ["https", "http", "ssh", "git", "file"]
    force_secure_cookies: bool = False
    require_api_key_for_reads: bool = True
    config_editor_enabled: bool = False
    session_lifetime_hours: Positive = 24 * 14
    workers: Positive = 2
    ldap: LdapSettings = LdapSettings()
    page_access: dict[str, PageAccess] = {}
    #: SHA-256 hex digests of bearer tokens that may read ``/metrics`` and nothing else
    #: (a Prometheus scraper's credentials); callers who may view the ``prometheus`` page
    #: (``page_access``, admins by default) may read it too
    metrics_tokens: list[TokenDigest] = []
    #: set by ``circus up``: its daemons' restart counts, shown by ``/health``
    supervisor_status_file: str | None = None
    #: host names, IP addresses or CIDR networks that notification and webhook targets
    #: may reach although they are not public (loopback, private, link-local, metadata);
    #: see circus/common/outbound.py
    outbound_allowlist: list[str] = []
    #: reverse proxies (addresses or networks) whose ``X-Forwarded-For`` names the real
    #: client; empty: the header is ignored and the peer address is the client
    trusted_proxies: list[str] = []
    #: live log streams (server-sent events) open at once, per server process: each holds
    #: one of its SERVER_THREADS threads, so the rest stay free for other requests
    max_log_streams: Positive = 16
    #: live log streams open at once from one client address
    max_log_streams_per_client: Positive = 4
    #: seconds figures aggregated over all builds (``/builds/stats``, time series) are
    #: reused by a server process before it recomputes them (in the background); 0: never
    aggregate_cache_seconds: float = Field(default=10.0, ge=0)
    #: an origin of its own (another host name for this server), e.g.
    #: ``https://ci-files.example.org``: products viewed in a browser are served only
    #: there, by signed short-lived links, never beside the session cookie
    products_origin: str | None = None

    def problems(self) -> list[Problem]:
        from circus.common.outbound import entry_problem

        found = []
        for i, entry in enumerate(self.outbound_allowlist):
            problem = entry_problem(entry)
            if problem:
                found.append(Problem(f"outbound_allowlist.{i}", problem))
        for index, proxy in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                found.append(Problem(f"trusted_proxies.{index}",
                                     f"not an IP address or network: {proxy!r}"))
        if self.max_log_streams >= SERVER_THREADS:
            found.append(Problem("max_log_streams", f"must be below {SERVER_THREADS} (the "
                                 "threads of a server process), or streams starve the rest"))
        for origin in self.allowed_origins:
            if origin != "*" and _url_problem(origin, ("http", "https")):
                found.append(Problem("allowed_origins", f"not an http(s) origin: {origin!r}"))
        found += digest_problems(self.metrics_tokens, "metrics_tokens")
        for page in self.page_access:
            if page not in DEFAULT_PAGE_ACCESS:
                known = ", ".join(sorted(DEFAULT_PAGE_ACCESS))
                found.append(Problem(f"page_access.{page}", f"unknown page (known: {known})"))
        if self.products_origin:
            problem = _url_problem(self.products_origin, ("http", "https"))
            parts = urlsplit(self.products_origin)
            if problem is None and (parts.path.strip("/") or parts.query):
                problem = f"must be an origin, without a path (got {self.products_origin!r})"
            if problem is None and self.base_url and \
                    urlsplit(self.base_url).netloc.lower() == parts.netloc.lower():
                problem = "must be another host than server.base_url"
            if problem:
                found.append(Problem("products_origin", problem))
        if self.base_url and _url_problem(self.base_url, ("http", "https")):
            found.append(Problem("base_url", _url_problem(self.base_url, ("http", "https")) or ""))
        storage = self.rate_limit_storage
        if storage is not None and not storage.startswith(
                ("memory://", "redis://", "rediss://", "redis+unix://")):
            found.append(Problem("rate_limit_storage", "must be memory:// or a redis:// URL "
                                 f"(got {storage.split('://')[0]!r})"))
        for limit, key in ((self.rate_limit_login, "rate_limit_login"),
                           (self.rate_limit_login_account, "rate_limit_login_account"),
                           (self.rate_limit_api, "rate_limit_api")):
            if not _is_rate(limit):
                found.append(Problem(key, f"must look like '10/minute' (got {limit!r})"))
        return found

    def access_for(self, page: str) -> PageAccess:
        return self.page_access.get(page, DEFAULT_PAGE_ACCESS.get(page, PageAccess.authenticated))


def _is_rate(value: str) -> bool:
    count, _, period = value.partition("/")
    return count.strip().isdigit() and period.strip() in (
        "second", "minute", "hour", "day", "seconds", "minutes", "hours", "days")


#: transports Nix fetches over the network (also as git+https, tarball+http, ...)
NETWORK_SCHEMES = ("http", "https", "ssh", "git")


def _names_a_host(prefix: str) -> bool:
    """Whether an ``allowed-uris`` prefix over the network names its host (prefixes of
    other kinds, ``file://``, paths, ``github:owner/``, are Nix's business)."""
    try:
        parts = urlsplit(prefix)
        if parts.scheme.lower().rpartition("+")[2] not in NETWORK_SCHEMES:
            return True
        target = prefix.split("+", 1)[1] if "+" in parts.scheme else prefix
        return "://" in prefix and bool(urlsplit(target).hostname)
    except ValueError:
        return False


class EvaluatorSettings(SettingsModel):
    secret_fields = ("upload_token",)

    #: seconds between beat ticks looking for due jobsets
    poll_interval: Positive = 10
    git_timeout: Positive = 120
    nix_timeout: Positive = 1800
    max_concurrent_evals: Positive = 2
    #: nix-eval-jobs --workers
    workers: Positive = 1
    #: nix-eval-jobs --max-memory-size, MiB
    max_memory_size: Positive = 4096
    work_dir: str = "/var/lib/circus/evaluator"
    #: Nix's restrict-eval: the expression reads only its inputs' store paths and
    #: ``allowed_uris`` (no /etc, no server files, ``builtins.getEnv`` sees nothing)
    restrict_eval: bool = True
    #: URI prefixes Nix code may fetch under in restricted mode (and flakes' inputs);
    #: each names a host, which must pass the outbound rule (public addresses or
    #: ``server.outbound_allowlist``) at every evaluation, else it is left out
    allowed_uris: list[str] = []
    allow_ifd: bool = False
    #: directories non-admins may name in ``path`` inputs and ``file://`` repositories
    #: (admins may name any); empty: only admins may use the server's disk
    allowed_path_inputs: list[str] = []
    #: the circus-server whose Nix store builders use, when it is not this host's
    #: (``https://ci.example.org``): before an evaluation's builds are committed, the
    #: .drv files and sources they need that the server lacks are uploaded there.
    #: Unset: this evaluator shares the server's store (one host, or a shared /nix)
    upload_derivations_to: str | None = None
    #: a token whose SHA-256 digest is in the server's ``remote_workers.auth_tokens``
    upload_token: str | None = None
    #: the uploader's name in the server's log (``X-Circus-Worker``); default: host name
    upload_name: str | None = None
    #: verify the server's TLS certificate against this CA bundle (default: system CAs)
    upload_ca_file: str | None = None
    upload_timeout_secs: Positive = 60

    @property
    def gc_roots_base(self) -> Path:
        return Path(self.work_dir) / "gcroots"

    def gc_roots_dir(self, evaluation_id: int) -> Path:
        """The GC roots of an evaluation's .drv files: the evaluator's own, and on the
        server those of the .drv files an evaluator on another host uploaded for it.
        The beat removes the directory once the evaluation's builds are done."""
        return self.gc_roots_base / f"eval-{evaluation_id}"

    def problems(self) -> list[Problem]:
        found = [Problem(f"allowed_path_inputs.{i}", f"must be an absolute path (got {d!r})")
                 for i, d in enumerate(self.allowed_path_inputs) if not d.startswith("/")]
        for i, prefix in enumerate(self.allowed_uris):
            if not _names_a_host(prefix):
                found.append(Problem(f"allowed_uris.{i}", (
                    f"must name a host (scheme://host/...), got {prefix!r}: under a prefix "
                    "without one Nix code may fetch from every host, internal ones too")))
        if self.upload_derivations_to is not None:
            if urlsplit(self.upload_derivations_to).scheme not in ("http", "https"):
                found.append(Problem("upload_derivations_to", "must be an http(s) URL (got "
                                     f"{self.upload_derivations_to!r})"))
            if not self.upload_token:
                found.append(Problem("upload_token", "is required with upload_derivations_to "
                                     "(or upload_token_file)"))
        return found


class RpcTlsSettings(SettingsModel):
    cert_file: str | None = None
    key_file: str | None = None
    client_ca: str | None = None
    pin_cn: str | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)

    def problems(self) -> list[Problem]:
        found = []
        if bool(self.cert_file) != bool(self.key_file):
            found.append(Problem("cert_file", "cert_file and key_file must be set together"))
        if self.require_client_cert and not self.client_ca:
            found.append(Problem("client_ca", "required when require_client_cert is true"))
        for key in ("cert_file", "key_file", "client_ca"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                found.append(Problem(key, f"file does not exist: {value}"))
        return found


class OidcSettings(SettingsModel):
    issuer: str | None = None
    jwks_url: str | None = None
    audiences: list[str] = []
    allowed_repositories: list[str] = []
    allowed_subjects: list[str] = []
    allowed_subject_prefixes: list[str] = []
    allowed_workflow_refs: list[str] = []
    allowed_refs: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.issuer is not None

    def problems(self) -> list[Problem]:
        found = []
        if self.enabled:
            if not self.audiences:
                found.append(Problem("audiences", "must not be empty when oidc.issuer is set"))
            if not self.allowed_repositories:
                found.append(Problem("allowed_repositories",
                                     "must not be empty when oidc.issuer is set"))
            problem = _url_problem(self.issuer or "", ("https", "http"))
            if problem:
                found.append(Problem("issuer", problem))
        return found


class RpcSettings(SettingsModel):
    secret_fields = ("auth_tokens",)

    #: ``host:port`` the agent gateway listens on; empty disables the gateway
    bind: str | None = None
    #: SHA-256 hex digests of accepted agent tokens (``sha256sum``'s lines are fine)
    auth_tokens: list[TokenDigest] = []
    max_connections: Positive = 256
    #: connections not registered yet, at most; more are closed at once (the
    #: gateway port may face the network: silence must not hold sockets open)
    max_unregistered: Positive = 16
    #: seconds a new connection has to register before it is closed
    register_timeout_secs: Annotated[float, AfterValidator(at_least(0.1))] = 10.0
    #: an agent not heard from for this long is dropped and its steps handed back
    #: (a host cut off the network never closes its connection)
    heartbeat_ttl_secs: Positive = 60
    presign_expiry_secs: Positive = 900
    allow_plaintext: bool = False
    cache_substituter: str | None = None
    cache_public_key: str | None = None
    tls: RpcTlsSettings = RpcTlsSettings()
    oidc: OidcSettings = OidcSettings()

    def problems(self) -> list[Problem]:
        found = []
        if self.bind is not None:
            host, sep, port = self.bind.rpartition(":")
            if not sep or not port.isdigit() or not host:
                found.append(Problem("bind", f"must be host:port (got {self.bind!r})"))
            if not self.auth_tokens and not self.oidc.enabled:
                found.append(Problem("auth_tokens",
                                     "must not be empty when the gateway is enabled (or set oidc)"))
        return found + digest_problems(self.auth_tokens)


class EphemeralPoolSettings(SettingsModel):
    secret_fields = ("github_token",)

    name: str
    repository: str
    workflow: str
    ref: str = "main"
    runner_url: str
    oidc_audience: str
    systems: list[str] = ["x86_64-linux"]
    features: list[str] = []
    max_jobs: Positive = 1
    max_inflight: Positive = 4
    inflight_ttl_secs: Positive = 600
    scale_up_cooldown_secs: NonNegative = 30
    github_token: str | None = None
    github_api_url: str = "https://api.github.com"

    def problems(self) -> list[Problem]:
        found = []
        if not self.runner_url.startswith(("https://", "tls://")):
            found.append(Problem("runner_url",
                                 f"must use TLS for GitHub pools (got {self.runner_url!r})"))
        if not self.github_token:
            found.append(Problem("github_token", "is required (or github_token_file)"))
        return found


class QueueRunnerSettings(SettingsModel):
    #: concurrent local build workers on the runner host; 0: none (agents, SSH
    #: builders or Celery build workers on other hosts do every build)
    workers: NonNegative = 2
    poll_interval: Positive = 5
    build_timeout: Positive = 36000
    max_silent_time: Positive = 3600
    max_log_size: Positive = 64 * 1024 * 1024
    max_output_size: NonNegative = 0
    failed_paths_cache: bool = True
    failed_paths_ttl: NonNegative = 86400
    unsupported_timeout: NonNegative = 60
    scheduling_strategy: SchedulingStrategy = SchedulingStrategy.speed_factor_only
    psi_threshold: Percent = 80.0
    #: systems the local workers build; empty means the host's own system
    local_systems: list[str] | None = None
    #: features the local workers support; unset means ``system-features`` from nix.conf
    local_features: list[str] | None = None
    local_mandatory_features: list[str] = []
    extra_nix_build_args: list[str] = []
    #: refuse SSH builders without a ``public_host_key`` (a given key is always checked)
    ssh_require_host_key: bool = True
    #: seconds an SSH builder has to accept a connection
    ssh_connect_timeout: Positive = 10
    #: a failing SSH builder rests this long after a failure, doubling with each further one
    ssh_backoff_secs: Positive = 30
    ssh_backoff_max_secs: Positive = 3600
    #: PATH for commands on SSH builders; unset keeps the login shell's PATH
    ssh_remote_path: str | None = None
    #: extra nix.conf settings for Nix on SSH builders (sent as ``NIX_CONFIG``)
    ssh_nix_config: dict[str, str] = {}
    max_retries: NonNegative = 3
    retry_backoff_secs: NonNegative = 10
    #: a succeeded build's post-processing (cache publish, closure size, GC root) not done
    #: this long after the build finished is tried again (the runner died, or the try
    #: failed), then after twice as long each time, up to ``postprocess_retry_max_secs``
    postprocess_retry_secs: Positive = 30
    postprocess_retry_max_secs: Positive = 3600
    #: retries before a build's post-processing is given up (logged as an error)
    postprocess_max_attempts: Positive = 20
    #: a worker renews its claim on a step this often; a lapsed lease returns the step
    lease_secs: Positive = 60
    #: derivations one local worker may realise in a single nix-store call (look-ahead
    #: follows chains up to this) while other consumers (agents, SSH builders, other
    #: runners) could take the class's steps: what a slot holds, they cannot build
    batch_size: Positive = 16
    #: ``batch_size`` while no other live consumer (another runner, a remote Celery
    #: worker, an SSH builder, a connected agent) could take the class's steps: nobody
    #: waits for what a slot holds, and fewer, longer batches mean fewer ``nix-store``
    #: starts and claim/report gaps (bench/build_overhead.py --e2e)
    batch_size_alone: Positive = 64
    #: a queued step nobody claimed for this long gets its wake-up message again
    republish_secs: Positive = 30
    #: order equal-priority steps by how many builds wait for them (critical path)
    critical_path_first: bool = False
    #: cgroup directory (v1 memory or v2) local builds are moved into: memory limits
    #: and exact OOM accounting for builds only (the daemon stays outside)
    build_cgroup: str | None = None
    #: unstepped builds the dispatcher turns into steps per transaction
    dispatch_batch_size: Positive = 2000
    rpc: RpcSettings = RpcSettings()
    ephemeral_pools: list[EphemeralPoolSettings] = []

    def problems(self) -> list[Problem]:
        names = [p.name for p in self.ephemeral_pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        found = [Problem("ephemeral_pools", f"duplicate pool name {n!r}") for n in dupes]
        if self.ephemeral_pools and not (self.rpc.bind and self.rpc.oidc.enabled):
            # launched agents register with their job's OIDC token at this gateway
            found.append(Problem("ephemeral_pools",
                                 "need the gateway (rpc.bind) with rpc.oidc configured"))
        for i, pool in enumerate(self.ephemeral_pools):
            if self.rpc.oidc.enabled and pool.oidc_audience not in self.rpc.oidc.audiences:
                found.append(Problem(f"ephemeral_pools[{i}].oidc_audience",
                                     f"{pool.oidc_audience!r} is not one of rpc.oidc.audiences"))
            if self.rpc.oidc.enabled and pool.repository.lower() not in {
                    r.lower() for r in self.rpc.oidc.allowed_repositories}:
                found.append(Problem(f"ephemeral_pools[{i}].repository",
                                     "is not in rpc.oidc.allowed_repositories"))
        if self.build_cgroup and not Path(self.build_cgroup, "cgroup.procs").is_file():
            found.append(Problem("build_cgroup",
                                 f"not a cgroup directory (no cgroup.procs): {self.build_cgroup}"))
        return found


class RemoteWorkerSettings(SettingsModel):
    """The API ``circus-worker`` hosts claim and report through (``/api/v1/workers``)."""

    secret_fields = ("auth_tokens",)

    #: SHA-256 hex digests of accepted worker tokens (``auth_tokens_file``: one per
    #: line); empty disables the API
    auth_tokens: list[str] = []
    #: largest output upload (one step's outputs as a ``nix-store --export`` stream)
    max_upload_size: Positive = 8 * 1024 * 1024 * 1024
    #: calls to /api/v1/workers per worker (name and token) with a valid token: their
    #: own budget, not the caller address's ``server.rate_limit_api`` (a host running
    #: many slots of short builds claims, renews and logs a lot)
    rate_limit: str = "6000/minute"

    @property
    def enabled(self) -> bool:
        return bool(self.auth_tokens)

    def problems(self) -> list[Problem]:
        found = digest_problems(self.auth_tokens)
        if not _is_rate(self.rate_limit):
            found.append(Problem("rate_limit",
                                 f"must look like '10/minute' (got {self.rate_limit!r})"))
        return found


class NixSettings(SettingsModel):
    #: binary caches Nix may substitute from; unset means nix.conf's, empty means none
    substituters: list[str] | None = None
    trusted_public_keys: list[str] | None = None
    #: flake registry file; unset means an empty local one (never GitHub's)
    flake_registry: str | None = None
    #: every build Circus starts (local, SSH builders) runs in Nix's sandbox: no host
    #: files but the store and ``sandbox_paths``, no network; false only for trusted code
    sandbox: bool = True
    #: host paths a sandboxed build sees read-only (``path``, ``target=source``, ``path?``
    #: when it may be missing); never /etc, /var, /home, /run or /tmp
    sandbox_paths: list[str] = list(DEFAULT_SANDBOX_PATHS)

    def problems(self) -> list[Problem]:
        found = []
        for i, entry in enumerate(self.sandbox_paths):
            problem = sandbox_path_problem(entry)
            if problem:
                found.append(Problem(f"sandbox_paths.{i}", problem))
        return found

    def sandbox_options(self) -> dict[str, str]:
        return sandbox_options(self.sandbox, self.sandbox_paths)


class GcSettings(SettingsModel):
    enabled: bool = True
    gc_roots_dir: str = "/nix/var/nix/gcroots/circus"
    max_age_days: NonNegative = 30
    cleanup_interval: Positive = 3600


class LogSettings(SettingsModel):
    log_dir: str = "/var/lib/circus/logs"
    compress: bool = True


class CacheSettings(SettingsModel):
    enabled: bool = True
    compression: Compression = Compression.zstd
    compression_level: int = 3
    #: where compressed NARs are kept on disk for serving
    cache_dir: str = "/var/lib/circus/cache"
    #: public URL of ``/nix-cache`` (advertised to agents and in channels)
    public_url: str | None = None
    priority: Positive = 30
    narinfo_cache_size: Positive = 65536
    #: seconds a served narinfo (or a miss) stays in the server's in-process cache
    narinfo_cache_ttl_secs: Positive = 60
    negative_cache_ttl_secs: NonNegative = 5
    #: a narinfo row younger than this is never removed by retention (publish in flight)
    retention_grace_secs: NonNegative = 3600


class SigningSettings(SettingsModel):
    secret_fields = ("key",)

    enabled: bool = False
    #: secret key in Nix's ``name:base64`` format (``nix-store --generate-binary-cache-key``)
    key: str | None = None

    def problems(self) -> list[Problem]:
        if self.enabled and not self.key:
            return [Problem("key", "is required when signing.enabled (or key_file)")]
        if self.key and (":" not in self.key):
            return [Problem("key", "must be in Nix's name:base64 format")]
        return []


class S3Settings(SettingsModel):
    secret_fields = ("secret_access_key", "access_key_id")

    region: str = "us-east-1"
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    use_path_style: bool = False


class CacheUploadSettings(SettingsModel):
    enabled: bool = False
    store_uri: str | None = None
    upload_concurrency: Positive = 4
    retries: NonNegative = 3
    fail_build_on_upload_error: bool = False
    compression: Compression = Compression.zstd
    #: lifetime of the presigned GET URLs /nix-cache redirects NAR downloads to
    presign_expiry_secs: Positive = 300
    s3: S3Settings = S3Settings()

    def problems(self) -> list[Problem]:
        if not self.enabled:
            return []
        if not self.store_uri or not self.store_uri.startswith("s3://") or \
                not self.store_uri[5:].strip("/"):
            return [Problem("store_uri", f"must be s3://bucket[/prefix] (got {self.store_uri!r})")]
        return []


class EmailSettings(SettingsModel):
    secret_fields = ("password",)

    enabled: bool = False
    host: str = "localhost"
    port: Port = 25
    tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    from_address: str = "circus@localhost"
    to: list[str] = []
    on_failure_only: bool = True
    #: CA bundle for verifying the SMTP server's certificate (system store when unset)
    ca_file: str | None = None
    timeout: Positive = 30


class SlackSettings(SettingsModel):
    secret_fields = ("webhook_url",)

    enabled: bool = False
    webhook_url: str | None = None
    on_failure_only: bool = False


class NotificationSettings(SettingsModel):
    secret_fields = ("github_token", "gitea_token", "forgejo_token", "gitlab_token")

    github_token: str | None = None
    github_api_url: str = "https://api.github.com"
    gitea_token: str | None = None
    #: Gitea base URL; when unset, derived from each project's repository URL
    gitea_url: str | None = None
    #: Forgejo speaks Gitea's API: these default to the gitea_* values
    forgejo_token: str | None = None
    forgejo_url: str | None = None
    gitlab_token: str | None = None
    gitlab_url: str = "https://gitlab.com"
    max_attempts: Positive = 5
    retry_base_secs: Positive = 10
    retry_max_secs: Positive = 3600
    retention_days: Positive = 30
    #: seconds between turning build events into notification tasks (and retry scans)
    collect_interval: Annotated[float, AfterValidator(at_least(0.1))] = 2.0
    #: seconds between deleting tasks older than ``retention_days``
    cleanup_interval: Positive = 3600
    #: timeout of each HTTP request to a forge, Slack or a webhook
    http_timeout: Positive = 10
    email: EmailSettings = EmailSettings()
    slack: SlackSettings = SlackSettings()

    def problems(self) -> list[Problem]:
        found = []
        for key in ("github_api_url", "gitea_url", "forgejo_url", "gitlab_url"):
            value = getattr(self, key)
            if value and _url_problem(value, ("http", "https")):
                found.append(Problem(key, _url_problem(value, ("http", "https")) or ""))
        if self.retry_max_secs < self.retry_base_secs:
            found.append(Problem("retry_max_secs", "must be at least retry_base_secs"))
        return found


class GithubOAuthSettings(SettingsModel):
    secret_fields = ("client_secret",)

    enabled: bool = False
    client_id: str | None = None
    client_secret: str | None = None
    authorize_url: str = "https://github.com/login/oauth/authorize"
    access_token_url: str = "https://github.com/login/oauth/access_token"
    api_url: str = "https://api.github.com"
    default_role: Role = Role.read_only
    #: when set, only members of one of these GitHub organizations may log in
    allowed_organizations: list[str] = []

    def problems(self) -> list[Problem]:
        found = []
        if self.enabled:
            if not self.client_id:
                found.append(Problem("client_id", "is required when oauth.github.enabled"))
            if not self.client_secret:
                found.append(Problem("client_secret", "is required when oauth.github.enabled"))
        return found


class OAuthSettings(SettingsModel):
    github: GithubOAuthSettings = GithubOAuthSettings()


# ---------------------------------------------------------------------------
# declarative objects


class DeclarativeInput(SettingsModel):
    name: str
    type: InputType = InputType.string
    value: str = ""


class DeclarativeJobset(SettingsModel):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str = ""
    nix_expression: str = "hydraJobs"
    flake_mode: bool = True
    branch: str | None = None
    state: JobsetState = JobsetState.enabled
    trigger_mode: TriggerMode = TriggerMode.source_change
    check_interval: NonNegative = 60
    scheduling_shares: Positive = 100
    keep_nr: NonNegative = 3
    #: rebuild succeeded builds with ``nix-store --check`` (mismatch: non_deterministic)
    check_reproducibility: bool = False
    inputs: list[DeclarativeInput] = []


class DeclarativeChannel(SettingsModel):
    name: str
    jobset: str
    #: manual: moved only by promote; automatic: follows the newest good evaluation
    mode: ChannelMode = ChannelMode.manual
    #: automatic mode: only this job (a release aggregate) must have succeeded
    aggregate_job: Annotated[str, Field(min_length=1, max_length=255)] | None = None


class DeclarativeMember(SettingsModel):
    username: str
    role: MemberRole = MemberRole.member


class DeclarativeWebhook(SettingsModel):
    secret_fields = ("secret",)

    forge_type: ForgeType
    secret: str | None = None
    enabled: bool = True


class DeclarativeNotification(SettingsModel):
    type: NotificationType
    config: dict[str, Any] = {}
    enabled: bool = True


class DeclarativeProject(SettingsModel):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str = ""
    repository_url: str = ""
    enabled: bool = True
    hidden: bool = False
    cache_enabled: bool = True
    owner: str | None = None
    jobsets: list[DeclarativeJobset] = []
    channels: list[DeclarativeChannel] = []
    members: list[DeclarativeMember] = []
    webhooks: list[DeclarativeWebhook] = []
    notifications: list[DeclarativeNotification] = []

    def problems(self) -> list[Problem]:
        found = []
        jobsets = {j.name for j in self.jobsets}
        for i, channel in enumerate(self.channels):
            if channel.jobset not in jobsets:
                found.append(Problem(f"channels[{i}].jobset",
                                     f"no jobset named {channel.jobset!r} in this project"))
        return found


class DeclarativeUser(SettingsModel):
    secret_fields = ("password",)

    username: Annotated[str, Field(min_length=1, max_length=128)]
    email: str | None = None
    full_name: str | None = None
    password: str | None = None
    role: Role = Role.read_only
    enabled: bool = True


class DeclarativeApiKey(SettingsModel):
    secret_fields = ("key",)

    name: str
    key: Annotated[str, Field(min_length=16)]
    role: Role = Role.read_only
    owner: str | None = None


class DeclarativeBuilder(SettingsModel):
    name: str
    ssh_uri: str
    systems: list[str] = ["x86_64-linux"]
    max_jobs: Positive = 1
    speed_factor: Annotated[float, AfterValidator(at_least(0.001))] = 1.0
    supported_features: list[str] = []
    mandatory_features: list[str] = []
    ssh_key_file: str | None = None
    public_host_key: str | None = None
    enabled: bool = True


class DeclarativeSettings(SettingsModel):
    projects: list[DeclarativeProject] = []
    users: list[DeclarativeUser] = []
    api_keys: list[DeclarativeApiKey] = []
    remote_builders: list[DeclarativeBuilder] = []

    def problems(self) -> list[Problem]:
        found = []
        for kind, names in (("projects", [p.name for p in self.projects]),
                            ("users", [u.username for u in self.users]),
                            ("api_keys", [k.name for k in self.api_keys]),
                            ("remote_builders", [b.name for b in self.remote_builders])):
            for name in sorted({n for n in names if names.count(n) > 1}):
                found.append(Problem(kind, f"duplicate name {name!r}"))
        return found


# ---------------------------------------------------------------------------


class Settings(SettingsModel):
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    server: ServerSettings = ServerSettings()
    evaluator: EvaluatorSettings = EvaluatorSettings()
    queue_runner: QueueRunnerSettings = QueueRunnerSettings()
    remote_workers: RemoteWorkerSettings = RemoteWorkerSettings()
    nix: NixSettings = NixSettings()
    gc: GcSettings = GcSettings()
    logs: LogSettings = LogSettings()
    cache: CacheSettings = CacheSettings()
    signing: SigningSettings = SigningSettings()
    cache_upload: CacheUploadSettings = CacheUploadSettings()
    notifications: NotificationSettings = NotificationSettings()
    oauth: OAuthSettings = OAuthSettings()
    tracing: TracingSettings = TracingSettings()
    declarative: DeclarativeSettings = DeclarativeSettings()

    def problems(self) -> list[Problem]:
        found = []
        if self.cache_upload.enabled and not self.signing.enabled:
            found.append(Problem("cache_upload.enabled", "requires signing.enabled"))
        return found

    def nix_environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        from circus.common.nix.environment import nix_environ

        return nix_environ(self.nix.substituters, self.nix.trusted_public_keys,
                           self.nix.flake_registry, {**self.nix.sandbox_options(), **(extra or {})})

    def require_database_url(self) -> str:
        if not self.database.url:
            raise ConfigError([Problem("database.url", "is required for this command")])
        return self.database.url

    def require_broker_url(self) -> str:
        if not self.broker.url:
            raise ConfigError([Problem("broker.url", "is required for this command")])
        return self.broker.url

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """A copy with some keys replaced (validated again); used by ``circus up`` and tests."""
        raw = deep_merge(self.model_dump(mode="json", exclude_unset=True), overrides)
        return validate_sections(Settings, raw)


def load_settings(
    files: list[Path] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults < ./circus.toml < $CIRCUS_CONFIG_FILE < CIRCUS_* vars.

    ``files`` replaces the default file list (used by tests and ``--config``).
    Raises :class:`ConfigError` listing every problem.
    """
    environ = os.environ if environ is None else environ
    if files is None:
        files = []
        local = Path("circus.toml")
        if local.is_file():
            files.append(local)
        if environ.get("CIRCUS_CONFIG_FILE"):
            files.append(Path(environ["CIRCUS_CONFIG_FILE"]))
    raw: dict[str, Any] = {}
    for path in files:
        raw = deep_merge(raw, read_toml(path))
    raw = deep_merge(raw, env_overrides(environ, ENV_PREFIX))
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate_sections(Settings, raw)
