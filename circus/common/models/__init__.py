"""SQLAlchemy models of every table (SPEC §2). Importing this registers them on ``Base``."""

from circus.common.models.base import Base
from circus.common.models.builds import (
    Build,
    BuildCompletionHour,
    BuildConstituent,
    BuildDependency,
    BuildIdBlock,
    BuildMetric,
    BuildOutput,
    BuildProduct,
    BuildStatusTotal,
    FailedPath,
    JobName,
    PendingPostprocessing,
    ProjectCompletionHour,
)
from circus.common.models.cache import NarInfo, NarInfoProject
from circus.common.models.evaluations import (
    Evaluation,
    EvaluationBuild,
    EvaluationError,
    EvaluationTotal,
)
from circus.common.models.machines import BuilderSession, RemoteBuilder
from circus.common.models.operations import (
    AuditLog,
    News,
    NotificationTask,
    ServiceCounter,
    ServiceHeartbeat,
)
from circus.common.models.projects import (
    Channel,
    Jobset,
    JobsetInput,
    NotificationConfig,
    Project,
    ProjectMember,
    WebhookConfig,
)
from circus.common.models.steps import BuildStep, QueueClass, Step, StepDependency
from circus.common.models.users import ApiKey, StarredJob, User, UserSession

__all__ = [
    "ApiKey",
    "AuditLog",
    "Base",
    "Build",
    "BuildCompletionHour",
    "BuildConstituent",
    "BuildDependency",
    "BuildIdBlock",
    "BuildMetric",
    "BuildOutput",
    "BuildProduct",
    "BuildStatusTotal",
    "BuildStep",
    "BuilderSession",
    "Channel",
    "Evaluation",
    "EvaluationBuild",
    "EvaluationError",
    "EvaluationTotal",
    "FailedPath",
    "JobName",
    "Jobset",
    "JobsetInput",
    "NarInfo",
    "NarInfoProject",
    "News",
    "NotificationConfig",
    "NotificationTask",
    "PendingPostprocessing",
    "Project",
    "ProjectCompletionHour",
    "ProjectMember",
    "QueueClass",
    "RemoteBuilder",
    "ServiceCounter",
    "ServiceHeartbeat",
    "StarredJob",
    "Step",
    "StepDependency",
    "User",
    "UserSession",
    "WebhookConfig",
]
