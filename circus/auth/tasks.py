"""Celery tasks of accounts (thin: they call the services)."""

from __future__ import annotations

import logging

from celery import shared_task

from circus.auth.directory import sync_ldap_users
from circus.common import messaging
from circus.common.celery import DbTask
from circus.common.errors import Unavailable

log = logging.getLogger(__name__)


@shared_task(name=messaging.LDAP_SYNC_TASK, bind=True, base=DbTask)  # type: ignore[untyped-decorator]
def sync_ldap(self: DbTask) -> dict[str, object]:
    try:
        report = sync_ldap_users(self.session, self.settings.server.ldap)
    except Unavailable as exc:
        # the next interval tries again; until then nothing changes
        log.warning("LDAP sync skipped: %s", exc.message)
        self.session.rollback()
        return {"skipped": exc.message}
    self.session.commit()
    return report.as_dict()
