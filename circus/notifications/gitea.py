"""Gitea and Forgejo commit statuses (``POST /api/v1/repos/{owner}/{repo}/statuses/{sha}``).

Forgejo speaks Gitea's API; its token and URL default to the Gitea ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.notifications.base import (
    Delivery,
    DeliveryError,
    Event,
    commit_state,
    post,
    string_problem,
    url_problem,
)


class GiteaStatus:
    """Config keys (all optional): ``repository`` (``owner/name``), ``url`` (the forge's
    base URL; default ``notifications.gitea_url``/``forgejo_url``, else the host of the
    project's repository URL), ``token``/``token_file``, ``context``."""

    supersedes = True

    def __init__(self, type: NotificationType, label: str) -> None:
        self.type = type
        self.label = label

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        return url_problem(config, "url") + string_problem(
            config, "repository", "token", "token_file", "context")

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        return True

    def _defaults(self, delivery: Delivery) -> tuple[str | None, str | None]:
        settings = delivery.settings.notifications
        if self.type is NotificationType.forgejo_status:
            return (settings.forgejo_token or settings.gitea_token,
                    settings.forgejo_url or settings.gitea_url)
        return settings.gitea_token, settings.gitea_url

    def deliver(self, delivery: Delivery) -> None:
        default_token, default_url = self._defaults(delivery)
        repository = delivery.repository()
        owner, name = repository.owner_and_name()
        base = delivery.config.get("url") or default_url or repository.web_base
        if not base:
            raise DeliveryError(f"no {self.label} URL: set the config's url", permanent=True)
        # without a configured URL the base comes from the project's repository URL: the
        # server's token is not sent there
        token = delivery.forge_token(self.label, str(base), default_url, default_token)
        post(f"{self.label} status",
             f"{str(base).rstrip('/')}/api/v1/repos/{owner}/{name}/statuses/{delivery.commit}",
             settings=delivery.settings,
             headers={"Authorization": f"token {token}", "User-Agent": "circus-ci"},
             json={"state": commit_state(delivery.event, delivery.status),
                   "target_url": delivery.target_url,
                   "description": delivery.description,
                   "context": delivery.context})
