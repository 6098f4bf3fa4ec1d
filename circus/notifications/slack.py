"""Slack incoming webhooks: one message per finished build."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.notifications.base import (
    Delivery,
    DeliveryError,
    Event,
    bool_problem,
    flag,
    is_failure,
    post,
    url_problem,
)


def _escape(text: str) -> str:
    # Slack's mrkdwn: only these three need escaping
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackWebhook:
    """Config keys (optional): ``webhook_url`` (default ``notifications.slack.webhook_url``
    when ``notifications.slack.enabled``), ``on_failure_only`` (default
    ``notifications.slack.on_failure_only``)."""

    type = NotificationType.slack
    supersedes = False

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        return url_problem(config, "webhook_url") + bool_problem(config, "on_failure_only")

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        if event is not Event.finished:
            return False
        if not config.get("webhook_url") and not (settings.notifications.slack.enabled and
                                                  settings.notifications.slack.webhook_url):
            return False
        if flag(config, "on_failure_only", settings.notifications.slack.on_failure_only):
            return is_failure(status)
        return True

    def deliver(self, delivery: Delivery) -> None:
        slack = delivery.settings.notifications.slack
        url = delivery.config.get("webhook_url") or (slack.webhook_url if slack.enabled
                                                     else None)
        if not url:
            raise DeliveryError("no Slack webhook URL", permanent=True)
        build, payload = delivery.build, delivery.payload
        icon = ":white_check_mark:" if delivery.status is BuildStatus.succeeded else ":x:"
        name = _escape(f"{payload['project']}:{payload['jobset']}:{build['job_name']}")
        text = (f"{icon} <{build['url']}|{name}> build {build['id']}: "
                f"{_escape(delivery.description)}")
        if payload.get("commit"):
            text += f" (commit {str(payload['commit'])[:12]})"
        post("Slack webhook", str(url), settings=delivery.settings, json={"text": text})
