"""LDAP users kept in step with the directory between their logins.

A user's role follows the directory's groups (``server.ldap.group_roles``) at every
LDAP login, and their API keys never have more than the user. But a key is used
without a login: an admin removed from the admins group, or whose entry was deleted,
kept the admin role (and every key of it) until they chose to log in again. Every
``server.ldap.sync_interval`` seconds the directory is read again for every enabled
LDAP user: a role the groups no longer grant is replaced by the one they grant, and a
user whose entry is gone is disabled (sessions ended, keys refused at once).

A directory that answers "no such entry" for *every* user is taken for a
misconfiguration (a service account that may not read the people, a moved base),
not for everybody having left: nothing is disabled then, and it is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus import audit
from circus.auth import ldap
from circus.auth.actor import Actor
from circus.auth.sessions import end_user_sessions
from circus.common.config import LdapSettings
from circus.common.enums import UserType
from circus.common.models import User

log = logging.getLogger(__name__)

SYNC_ACTOR = Actor.system("ldap-sync")


@dataclass
class SyncReport:
    checked: int = 0
    disabled: list[str] = field(default_factory=list)
    role_changes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"checked": self.checked, "disabled": self.disabled,
                "role_changes": self.role_changes}


def sync_ldap_users(session: Session, config: LdapSettings) -> SyncReport:
    """Read every enabled LDAP user's entry and groups again and apply what changed
    (the caller commits). Raises ``Unavailable`` when the directory does not answer
    (nothing is changed then)."""
    report = SyncReport()
    # no row locks while the directory is asked (seconds per user at worst): only the
    # columns that change are written, as a login would write them
    users = [user for user in session.scalars(
        select(User).where(User.user_type == UserType.ldap, User.enabled.is_(True))
        .order_by(User.id)) if user.external_id]
    if not users:
        return report
    seen = ldap.read_users(config, [(u.external_id or "", u.username) for u in users])
    report.checked = len(seen)
    gone = [u for u in users if u.external_id in seen and not seen[u.external_id].exists]
    if len(gone) == len(users) > 1:
        log.error("the directory has none of the %d LDAP users' entries: nothing disabled "
                  "(can server.ldap.bind_dn read them? has the base moved?)", len(users))
        gone = []
    for user in gone:
        user.enabled = False
        end_user_sessions(session, user.id)
        audit.record(session, SYNC_ACTOR, "user.update", f"user:{user.username}",
                     {"enabled": False, "reason": "no longer in the directory"})
        report.disabled.append(user.username)
    for user in users:
        entry = seen.get(user.external_id or "")
        if user in gone or entry is None or entry.role is None or entry.role is user.role:
            continue
        audit.record(session, SYNC_ACTOR, "user.update", f"user:{user.username}",
                     {"role": entry.role.value, "previous_role": user.role.value,
                      "reason": "directory groups"})
        report.role_changes[user.username] = entry.role.value
        user.role = entry.role
    if report.disabled or report.role_changes:
        log.warning("LDAP sync: disabled %s, roles changed %s", report.disabled,
                    report.role_changes)
    return report
