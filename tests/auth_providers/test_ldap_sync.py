"""LDAP users between logins: a demoted or deleted directory admin's API key loses its
power at the next sync, not at a login the holder never makes (real slapd)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import ldap
import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

import celeryconfig
from circus.auth.directory import sync_ldap_users
from circus.common.config import LdapSettings, Settings
from circus.common.enums import Role, UserType
from circus.common.errors import Unavailable
from circus.common.messaging import LDAP_SYNC_TASK
from circus.common.models import AuditLog, User
from tests.api.conftest import Keys
from tests.auth_providers.conftest import ldap_section
from tests.auth_providers.slapd import GROUPS, PEOPLE, ROOT_DN, ROOT_PASSWORD, Slapd
from tests.helpers.net import free_port

MakeClient = Callable[..., FlaskClient]
ADMINS = f"cn=circus-admins,{GROUPS}"


class Directory:
    """The directory's administrator: adds people and changes groups (as the root DN)."""

    def __init__(self, slapd: Slapd) -> None:
        self.conn = ldap.initialize(slapd.uri)
        self.conn.simple_bind_s(ROOT_DN, ROOT_PASSWORD)
        self.added: list[str] = []

    def person(self, uid: str, password: str, *, admin: bool) -> str:
        dn = f"uid={uid},{PEOPLE}"
        self.conn.add_s(dn, [("objectClass", [b"inetOrgPerson"]), ("uid", [uid.encode()]),
                             ("cn", [uid.encode()]), ("sn", [uid.encode()]),
                             ("userPassword", [password.encode()])])
        self.added.append(dn)
        if admin:
            self.conn.modify_s(ADMINS, [(ldap.MOD_ADD, "member", [dn.encode()])])
        return dn

    def leave_admins(self, dn: str) -> None:
        self.conn.modify_s(ADMINS, [(ldap.MOD_DELETE, "member", [dn.encode()])])

    def delete(self, dn: str) -> None:
        self.conn.delete_s(dn)
        self.added.remove(dn)

    def close(self) -> None:
        for dn in self.added:
            try:
                self.leave_admins(dn)
            except ldap.LDAPError:
                pass
            self.conn.delete_s(dn)
        self.conn.unbind_s()


@pytest.fixture
def directory(slapd: Slapd) -> Iterator[Directory]:
    admin = Directory(slapd)
    try:
        yield admin
    finally:
        admin.close()


def config(slapd: Slapd) -> LdapSettings:
    return LdapSettings.model_validate(ldap_section(
        slapd, group_roles={ADMINS: "admin"}, group_search_base=GROUPS))


def logged_in(make_client: MakeClient, slapd: Slapd, db: Session, uid: str,
              password: str) -> User:
    client = make_client(server={"ldap": config(slapd).model_dump()})
    response = client.post("/api/v1/auth/ldap", json={"username": uid, "password": password})
    assert response.status_code == 200, response.get_json()
    user = db.scalar(select(User).where(User.username == uid))
    assert user is not None
    return user


def test_a_demoted_directory_admins_key_loses_the_role_at_the_next_sync(
        make_client: MakeClient, slapd: Slapd, db: Session, keys: Keys,
        directory: Directory) -> None:
    uid = f"mallory{uuid.uuid4().hex[:6]}"
    dn = directory.person(uid, "mallory-password", admin=True)
    user = logged_in(make_client, slapd, db, uid, "mallory-password")
    assert user.role is Role.admin
    # the admin makes an admin key, then is taken out of the admins group (fired)
    key = keys.headers(Role.admin, owner=user, name=f"{uid}-key")
    api = make_client(server={"ldap": config(slapd).model_dump()})
    assert api.get("/api/v1/users", headers=key).status_code == 200
    directory.leave_admins(dn)
    # without a login nothing changes: the key is still an admin's (the old gap)
    assert api.get("/api/v1/users", headers=key).status_code == 200

    report = sync_ldap_users(db, config(slapd))
    db.commit()

    assert report.role_changes == {uid: "read-only"}
    refused = api.get("/api/v1/users", headers=key)
    assert refused.status_code == 403, refused.get_json()
    assert api.get("/api/v1/me", headers=key).get_json()["role"] == "read-only"
    change = db.scalar(select(AuditLog).where(AuditLog.target == f"user:{uid}",
                                              AuditLog.action == "user.update")
                       .order_by(AuditLog.id.desc()))
    assert change is not None
    assert change.actor == "ldap-sync"
    assert change.details["previous_role"] == "admin"

    # the entry deleted from the directory: disabled, every key refused
    directory.delete(dn)
    report = sync_ldap_users(db, config(slapd))
    db.commit()
    assert report.disabled == [uid]
    assert api.get("/api/v1/me", headers=key).status_code == 401
    assert not db.scalar(select(User.enabled).where(User.id == user.id))


def test_a_directory_that_knows_nobody_or_does_not_answer_changes_nothing(
        slapd: Slapd, db: Session) -> None:
    # every user "gone" at once is a misconfiguration (a base moved, a service account
    # that may not read people), not everybody leaving: nobody is disabled
    for uid in ("ghost1", "ghost2"):
        db.add(User(username=uid, role=Role.admin, enabled=True, user_type=UserType.ldap,
                    external_id=f"uid={uid},{PEOPLE}"))
    db.commit()
    report = sync_ldap_users(db, config(slapd))
    assert report.disabled == []
    assert all(db.scalars(select(User.enabled).where(User.username.like("ghost%"))))
    # a directory that does not answer: an error, nothing changed
    down = config(slapd).model_copy(update={"uri": f"ldap://127.0.0.1:{free_port()}/",
                                            "timeout": 2})
    with pytest.raises(Unavailable):
        sync_ldap_users(db, down)
    assert all(db.scalars(select(User.enabled).where(User.username.like("ghost%"))))


def test_the_sync_runs_on_the_beat_when_ldap_is_on(make_settings: Callable[..., Settings],
                                                   slapd: Slapd) -> None:
    on = make_settings(server={"ldap": ldap_section(slapd, sync_interval=120)})
    entry = celeryconfig.beat_schedule(on)["ldap-sync"]
    assert entry["task"] == LDAP_SYNC_TASK
    assert entry["schedule"].total_seconds() == 120
    assert entry["options"]["queue"] == celeryconfig.MAINTENANCE_QUEUE
    assert "ldap-sync" not in celeryconfig.beat_schedule(
        make_settings(server={"ldap": ldap_section(slapd, sync_interval=0)}))
    assert "ldap-sync" not in celeryconfig.beat_schedule(make_settings())
