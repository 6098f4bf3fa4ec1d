"""Enumerations shared by every component.

Kept free of SQLAlchemy so the agent and the config loader can import them.
"""

from __future__ import annotations

import enum


class BuildStatus(enum.IntEnum):
    """Build status with Hydra-compatible numeric codes (SPEC §2)."""

    pending = 0
    running = 1
    succeeded = 2
    failed = 3
    dependency_failed = 4
    aborted = 5
    cancelled = 6
    failed_with_output = 7
    timeout = 8
    cached_failure = 9
    unsupported_system = 10
    log_limit_exceeded = 11
    nar_size_limit_exceeded = 12
    non_deterministic = 13
    oom_killed = 14

    @property
    def is_finished(self) -> bool:
        return self not in (BuildStatus.pending, BuildStatus.running)

    @property
    def is_success(self) -> bool:
        return self is BuildStatus.succeeded

    @classmethod
    def from_name(cls, name: str) -> BuildStatus:
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown build status {name!r}") from None


FINISHED_BUILD_STATUSES = frozenset(s for s in BuildStatus if s.is_finished)


StrEnum = enum.StrEnum


class StepState(StrEnum):
    """Where a derivation step is in its life (DESIGN §3)."""

    pending = "pending"  # waiting for dependency steps
    queued = "queued"  # runnable, message published onto its class queue
    running = "running"  # claimed by a worker that holds a lease
    done = "done"  # finished; `status` says how


#: the states of steps still to finish, listed (``IN``, served by the state index;
#: ``!= done`` is not, and read every active step's row)
ACTIVE_STEP_STATES = [StepState.pending, StepState.queued, StepState.running]


class EvaluationStatus(StrEnum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"

    @property
    def is_finished(self) -> bool:
        return self not in (EvaluationStatus.pending, EvaluationStatus.running)


class ChannelMode(StrEnum):
    """How a channel moves: only by promote, or by itself to the newest good evaluation."""

    manual = "manual"
    automatic = "automatic"


class TriggerKind(StrEnum):
    source_change = "source_change"
    manual = "manual"
    interval = "interval"
    webhook = "webhook"


class JobsetState(StrEnum):
    disabled = "disabled"
    enabled = "enabled"
    one_shot = "one_shot"
    one_at_a_time = "one_at_a_time"


class TriggerMode(StrEnum):
    source_change = "source_change"
    interval = "interval"


class InputType(StrEnum):
    git = "git"
    string = "string"
    boolean = "boolean"
    path = "path"
    build = "build"
    nix = "nix"


class Role(StrEnum):
    """Global roles of users and API keys (SPEC §9)."""

    admin = "admin"
    create_projects = "create-projects"
    restart_jobs = "restart-jobs"
    cancel_build = "cancel-build"
    bump_to_front = "bump-to-front"
    eval_jobset = "eval-jobset"
    read_only = "read-only"


class MemberRole(StrEnum):
    member = "member"
    maintainer = "maintainer"
    admin = "admin"


class UserType(StrEnum):
    local = "local"
    github = "github"
    ldap = "ldap"


class NotificationType(StrEnum):
    github_status = "github_status"
    gitea_status = "gitea_status"
    forgejo_status = "forgejo_status"
    gitlab_status = "gitlab_status"
    webhook = "webhook"
    slack = "slack"
    email = "email"


class NotificationTaskStatus(StrEnum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"


class ForgeType(StrEnum):
    github = "github"
    gitea = "gitea"
    forgejo = "forgejo"
    gitlab = "gitlab"


class ActorKind(StrEnum):
    api_key = "api_key"
    user = "user"
    anonymous = "anonymous"
    system = "system"


class AuthKind(StrEnum):
    token = "token"
    oidc = "oidc"


class Compression(StrEnum):
    zstd = "zstd"
    xz = "xz"
    none = "none"


class SchedulingStrategy(StrEnum):
    speed_factor_only = "speed_factor_only"
    cpu_core_count_with_speed_factor = "cpu_core_count_with_speed_factor"
    dynamic = "dynamic"


class PageAccess(StrEnum):
    public = "public"
    authenticated = "authenticated"
    admin = "admin"
