"""Email over SMTP (plain, implicit TLS or STARTTLS) for finished builds."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from circus.common.config import EmailSettings, Settings
from circus.common.enums import BuildStatus, NotificationType
from circus.notifications.base import (
    Delivery,
    DeliveryError,
    Event,
    bool_problem,
    flag,
    is_failure,
)


def _recipients(config: Mapping[str, Any], settings: EmailSettings) -> list[str]:
    value = config.get("to")
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    if isinstance(value, list):
        return [str(a).strip() for a in value if str(a).strip()]
    return list(settings.to)


class EmailNotification:
    """Config keys: ``to`` (list or comma-separated; default ``notifications.email.to``),
    ``on_failure_only`` (default ``notifications.email.on_failure_only``). The SMTP server
    is ``[notifications.email]``; nothing is sent unless ``notifications.email.enabled``."""

    type = NotificationType.email
    supersedes = False

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        found = bool_problem(config, "on_failure_only")
        to = config.get("to")
        if to is not None and not (isinstance(to, str) or (
                isinstance(to, list) and all(isinstance(a, str) for a in to))):
            found.append("to must be an address or a list of addresses")
        for address in _recipients(config, EmailSettings()):
            if "@" not in address or any(c in address for c in "\r\n<>"):
                found.append(f"to: not an email address: {address!r}")
        return found

    def wants(self, settings: Settings, config: Mapping[str, Any], event: Event,
              status: BuildStatus) -> bool:
        email = settings.notifications.email
        if event is not Event.finished or not email.enabled:
            return False
        if not _recipients(config, email):
            return False
        if flag(config, "on_failure_only", email.on_failure_only):
            return is_failure(status)
        return True

    def message(self, delivery: Delivery) -> EmailMessage:
        email = delivery.settings.notifications.email
        build, payload = delivery.build, delivery.payload
        job = f"{payload['project']}:{payload['jobset']}:{build['job_name']}"
        message = EmailMessage()
        message["Subject"] = f"[circus] {job}: {delivery.description}"
        message["From"] = email.from_address
        message["To"] = ", ".join(_recipients(delivery.config, email))
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain=email.from_address.rpartition("@")[2] or None)
        lines = [
            f"Build {build['id']} of {job} finished: {build['status']}.",
            "",
            f"Build page:  {build['url']}",
            f"Derivation:  {build['drv_path']}",
            f"System:      {build['system']}",
        ]
        if payload.get("commit"):
            lines.append(f"Commit:      {payload['commit']}")
        if build.get("error_message"):
            lines += ["", "Error:", str(build["error_message"])]
        message.set_content("\n".join(lines) + "\n")
        return message

    def deliver(self, delivery: Delivery) -> None:
        email = delivery.settings.notifications.email
        recipients = _recipients(delivery.config, email)
        if not recipients:
            raise DeliveryError("no recipients", permanent=True)
        message = self.message(delivery)
        context = ssl.create_default_context(cafile=email.ca_file)
        try:
            smtp: smtplib.SMTP
            if email.tls:
                smtp = smtplib.SMTP_SSL(email.host, email.port, timeout=email.timeout,
                                        context=context)
            else:
                smtp = smtplib.SMTP(email.host, email.port, timeout=email.timeout)
            with smtp:
                if email.starttls and not email.tls:
                    smtp.starttls(context=context)
                if email.username:
                    smtp.login(email.username, email.password or "")
                refused = smtp.send_message(message, to_addrs=recipients)
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"SMTP login refused ({exc.smtp_code})", permanent=True) \
                from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"SMTP server refused every recipient: "
                                f"{', '.join(sorted(exc.recipients))}", permanent=True) from None
        except (smtplib.SMTPException, OSError) as exc:
            # connection refused, TLS failure, 4xx answers: try again later
            raise DeliveryError(f"SMTP {email.host}:{email.port}: {type(exc).__name__}: "
                                f"{exc}"[:500]) from None
        if refused:
            # delivered to some: retrying would send duplicates to the others
            raise DeliveryError("SMTP server refused " + ", ".join(sorted(refused)),
                                permanent=True)
