"""GitHub commit statuses (``POST /repos/{owner}/{repo}/statuses/{sha}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.notifications.base import (
    Delivery,
    Event,
    commit_state,
    post,
    string_problem,
    url_problem,
)


class GithubStatus:
    """Config keys (all optional): ``repository`` (``owner/name``; default: the project's
    repository URL), ``token``/``token_file`` (default ``notifications.github_token``),
    ``api_url`` (default ``notifications.github_api_url``), ``context`` (check-name prefix)."""

    type = NotificationType.github_status
    supersedes = True

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        return url_problem(config, "api_url") + string_problem(
            config, "repository", "token", "token_file", "context")

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        return True

    def deliver(self, delivery: Delivery) -> None:
        settings = delivery.settings.notifications
        api = str(delivery.config.get("api_url") or settings.github_api_url).rstrip("/")
        token = delivery.forge_token("GitHub", api, settings.github_api_url,
                                     settings.github_token)
        owner, name = delivery.repository().owner_and_name()
        post("GitHub status", f"{api}/repos/{owner}/{name}/statuses/{delivery.commit}",
             settings=delivery.settings,
             headers={"Authorization": f"Bearer {token}",
                      "Accept": "application/vnd.github+json",
                      "X-GitHub-Api-Version": "2022-11-28",
                      "User-Agent": "circus-ci"},
             json={"state": commit_state(delivery.event, delivery.status),
                   "target_url": delivery.target_url,
                   "description": delivery.description[:140],
                   "context": delivery.context})
