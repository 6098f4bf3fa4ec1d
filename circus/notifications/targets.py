"""The notification targets by type, and config validation for the API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from circus.common.enums import NotificationType
from circus.notifications.base import Target
from circus.notifications.email import EmailNotification
from circus.notifications.gitea import GiteaStatus
from circus.notifications.github import GithubStatus
from circus.notifications.gitlab import GitlabStatus
from circus.notifications.slack import SlackWebhook
from circus.notifications.webhook import JsonWebhook

TARGETS: dict[NotificationType, Target] = {
    NotificationType.github_status: GithubStatus(),
    NotificationType.gitea_status: GiteaStatus(NotificationType.gitea_status, "Gitea"),
    NotificationType.forgejo_status: GiteaStatus(NotificationType.forgejo_status, "Forgejo"),
    NotificationType.gitlab_status: GitlabStatus(),
    NotificationType.webhook: JsonWebhook(),
    NotificationType.slack: SlackWebhook(),
    NotificationType.email: EmailNotification(),
}


def target(type: NotificationType) -> Target:
    return TARGETS[type]


def config_problems(type: NotificationType, config: Mapping[str, Any]) -> list[str]:
    """What is wrong with a notification config of ``type`` (empty: fine)."""
    return TARGETS[type].problems(config)
