"""GitLab commit (pipeline) statuses (``POST /api/v4/projects/{id}/statuses/{sha}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.notifications.base import (
    Delivery,
    Event,
    is_infrastructure,
    post,
    string_problem,
    url_problem,
)


def gitlab_state(event: Event, status: BuildStatus) -> str:
    """GitLab's states: pending, running, success, failed, canceled."""
    if event is Event.queued:
        return "pending"
    if event is Event.started:
        return "running"
    if status is BuildStatus.succeeded:
        return "success"
    if status is BuildStatus.cancelled:
        return "canceled"
    return "failed"


class GitlabStatus:
    """Config keys (all optional): ``repository`` (``group/…/name`` or a numeric project
    id), ``url`` (default ``notifications.gitlab_url``), ``token``/``token_file`` (default
    ``notifications.gitlab_token``), ``context``."""

    type = NotificationType.gitlab_status
    supersedes = True

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        return url_problem(config, "url") + string_problem(
            config, "token", "token_file", "context") + (
            ["repository must be a string or a project id"]
            if "repository" in config and not isinstance(config["repository"], str | int)
            else [])

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        return True

    def deliver(self, delivery: Delivery) -> None:
        settings = delivery.settings.notifications
        base = str(delivery.config.get("url") or settings.gitlab_url).rstrip("/")
        token = delivery.forge_token("GitLab", base, settings.gitlab_url, settings.gitlab_token)
        configured = delivery.config.get("repository")
        project = str(configured) if isinstance(configured, int) else \
            delivery.repository().path
        state = gitlab_state(delivery.event, delivery.status)
        description = delivery.description
        if state == "failed" and is_infrastructure(delivery.status):
            description = f"error: {description}"
        post("GitLab status",
             f"{base}/api/v4/projects/{quote(project, safe='')}/statuses/{delivery.commit}",
             settings=delivery.settings,
             headers={"PRIVATE-TOKEN": token, "User-Agent": "circus-ci"},
             json={"state": state, "name": delivery.context,
                   "target_url": delivery.target_url, "description": description})
