"""Generic JSON webhook: POST of the event payload to a URL.

The body is the payload documented in docs/DESIGN.md ("Notifications and
webhooks"). With a ``secret``, ``X-Circus-Signature-256: sha256=<hex>`` carries the
HMAC-SHA256 of the body (GitHub's scheme), so receivers can verify it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.notifications.base import (
    Delivery,
    Event,
    bool_problem,
    flag,
    is_failure,
    post,
    string_problem,
    url_problem,
)


class JsonWebhook:
    """Config keys: ``url`` (required), ``secret``/``secret_file``, ``on_failure_only``
    (finished events of failed builds only); ``events`` and ``jobs`` as for every type."""

    type = NotificationType.webhook
    supersedes = False

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        return url_problem(config, "url", required=True) + string_problem(
            config, "secret", "secret_file") + bool_problem(config, "on_failure_only")

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        if flag(config, "on_failure_only", False):
            return is_failure(status)
        return True

    def deliver(self, delivery: Delivery) -> None:
        body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "circus-ci",
                   "X-Circus-Event": delivery.event.value}
        secret = delivery.secret("secret", None)
        if secret:
            digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Circus-Signature-256"] = f"sha256={digest}"
        post("webhook", str(delivery.config["url"]), settings=delivery.settings, data=body,
             headers=headers)
