"""LDAP logins against a real slapd: binds, user creation, injection, TLS, failures."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import ldap
import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.auth import ldap as circus_ldap
from circus.auth import passwords
from circus.common.config import LdapSettings
from circus.common.enums import Role, UserType
from circus.common.models import AuditLog, User, UserSession
from tests.api.conftest import Keys
from tests.auth_providers.conftest import ldap_section
from tests.auth_providers.slapd import (
    GROUPS,
    PEOPLE,
    READER_DN,
    READER_PASSWORD,
    ROBOT_DN,
    ROBOT_PASSWORD,
    ROOT_DN,
    ROOT_PASSWORD,
    TEMPLATE,
    Slapd,
)
from tests.helpers.net import free_port

MakeClient = Callable[..., FlaskClient]


def ldap_login(client: FlaskClient, username: str, password: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    response = client.post("/api/v1/auth/ldap", json={"username": username,
                                                      "password": password})
    return response.status_code, response.get_json()


def users(db: Session) -> list[User]:
    return list(db.scalars(select(User).order_by(User.id)))


def test_first_login_creates_the_user_and_a_working_session(
        make_client: MakeClient, slapd: Slapd, db: Session) -> None:
    client = make_client(server={"ldap": ldap_section(slapd, default_role="eval-jobset")})
    status, body = ldap_login(client, "alice", "alice-password")
    assert status == 200, body
    assert body["user"]["username"] == "alice"
    assert body["user"]["user_type"] == "ldap"
    assert body["user"]["external_id"] == f"uid=alice,{PEOPLE}"
    assert body["user"]["role"] == "eval-jobset"
    assert body["user"]["has_password"] is False
    # the user's own bind may read cn; mail is hidden from the user by the ACL
    assert body["user"]["full_name"] == "Alice Liddell"
    assert body["user"]["email"] is None
    me = client.get("/api/v1/me")
    assert me.status_code == 200
    assert me.get_json()["username"] == "alice"
    assert me.get_json()["auth"] == "session"
    # the session works for mutations with the CSRF token it was given
    response = client.post("/api/v1/auth/logout", headers={"X-CSRFToken": body["csrf_token"]})
    assert response.status_code == 204
    assert client.get("/api/v1/me").status_code == 401
    audit = db.execute(select(AuditLog.action, AuditLog.actor, AuditLog.details)
                       .where(AuditLog.action.in_(["user.create", "auth.login"]))
                       .order_by(AuditLog.id)).all()
    assert [(a, actor) for a, actor, _ in audit] == [("user.create", "ldap-login"),
                                                     ("auth.login", "alice")]
    assert audit[1][2] == {"provider": "ldap"}


def test_later_logins_reuse_the_user_and_keep_an_admins_role_change(
        make_client: MakeClient, slapd: Slapd, db: Session) -> None:
    client = make_client(server={"ldap": ldap_section(slapd)})
    status, body = ldap_login(client, "bob", "bob-password")
    assert status == 200
    assert body["user"]["role"] == "read-only"
    user = db.get(User, body["user"]["id"])
    assert user is not None
    first_login = user.last_login_at
    assert first_login is not None
    user.role = Role.admin
    db.commit()
    # another spelling of the same entry is the same user (DNs compare without case)
    status, body = ldap_login(make_client(server={"ldap": ldap_section(slapd)}), "BOB",
                              "bob-password")
    assert status == 200, body
    assert body["user"]["id"] == user.id
    assert body["user"]["role"] == "admin"
    assert body["user"]["username"] == "bob"
    db.refresh(user)
    assert user.last_login_at is not None
    assert user.last_login_at > first_login
    assert len([u for u in users(db) if u.user_type is UserType.ldap]) == 1


def test_wrong_password_and_unknown_user_are_401_and_audited(
        make_client: MakeClient, slapd: Slapd, db: Session) -> None:
    client = make_client(server={"ldap": ldap_section(slapd)})
    for username, password in [("alice", "wrong"), ("nobody", "alice-password"),
                               ("alice", ""), ("", "x")]:
        status, body = ldap_login(client, username, password)
        assert status in (400, 401), (username, status, body)
    status, body = ldap_login(client, "alice", "wrong")
    assert status == 401
    assert body["error"] == "invalid username or password"
    assert client.get("/api/v1/me").status_code == 401
    assert users(db) == []
    failed = db.execute(select(AuditLog.target, AuditLog.details)
                        .where(AuditLog.action == "auth.login_failed")).all()
    assert ("user:alice", {"provider": "ldap", "reason": "invalid username or password"}
            ) in failed
    assert ("user:nobody", {"provider": "ldap", "reason": "invalid username or password"}
            ) in failed


def test_dn_injection_is_escaped_and_never_binds_as_another_entry(
        make_client: MakeClient, slapd: Slapd, db: Session) -> None:
    # without escaping, "robot,uid=alice" would name the entry below alice, and bind
    unescaped = TEMPLATE.replace("{username}", "robot,uid=alice")
    assert unescaped == ROBOT_DN
    raw = ldap.initialize(slapd.uri)
    raw.simple_bind_s(unescaped, ROBOT_PASSWORD)
    raw.unbind_s()

    config = LdapSettings(**ldap_section(slapd))
    assert circus_ldap.bind_dn(config, "robot,uid=alice") == f"uid=robot\\,uid\\=alice,{PEOPLE}"
    assert circus_ldap.bind_dn(config, "admin,dc=evil") == f"uid=admin\\,dc\\=evil,{PEOPLE}"

    client = make_client(server={"ldap": ldap_section(slapd)})
    for username, password in [("robot,uid=alice", ROBOT_PASSWORD),
                               ("*)(uid=*", "alice-password"), ("*", "alice-password"),
                               ("admin,dc=evil", "alice-password"),
                               ("alice+cn=Alice Liddell", "alice-password"),
                               (" alice", "wrong"), ("alice\\", "alice-password")]:
        status, body = ldap_login(client, username, password)
        assert status == 401, (username, body)
    assert client.get("/api/v1/me").status_code == 401
    assert users(db) == []
    assert db.scalars(select(UserSession)).all() == []


def test_ldaps_with_the_test_ca(make_client: MakeClient, slapd: Slapd) -> None:
    good = make_client(server={"ldap": ldap_section(
        slapd, uri=slapd.ldaps_uri, tls_ca_file=str(slapd.ca_file))})
    status, body = ldap_login(good, "carol", "carol-password")
    assert status == 200, body
    # the system's CAs do not know the test CA
    untrusted = make_client(server={"ldap": ldap_section(slapd, uri=slapd.ldaps_uri)})
    assert ldap_login(untrusted, "carol", "carol-password")[0] == 503


def test_start_tls_with_the_test_ca(make_client: MakeClient, slapd: Slapd) -> None:
    good = make_client(server={"ldap": ldap_section(
        slapd, start_tls=True, tls_ca_file=str(slapd.ca_file))})
    status, body = ldap_login(good, "carol", "carol-password")
    assert status == 200, body
    # a CA that did not sign the server's certificate: refused, and said so
    bad = make_client(server={"ldap": ldap_section(
        slapd, start_tls=True, tls_ca_file=str(slapd.other_ca_file))})
    status, body = ldap_login(bad, "carol", "carol-password")
    assert status == 503, body
    assert body["error"] == "the directory server cannot be reached"
    assert bad.get("/api/v1/me").status_code == 401


def test_service_account_reads_the_profile(make_client: MakeClient, slapd: Slapd) -> None:
    client = make_client(server={"ldap": ldap_section(
        slapd, bind_dn=READER_DN, bind_password=READER_PASSWORD)})
    status, body = ldap_login(client, "dave", "dave-password")
    assert status == 200, body
    assert body["user"]["email"] == "dave@example.org"
    assert body["user"]["full_name"] == "Dave Lister"
    # a wrong service password is the server's problem, not the user's: 503
    broken = make_client(server={"ldap": ldap_section(
        slapd, bind_dn=READER_DN, bind_password="wrong")})
    status, body = ldap_login(broken, "erin", "erin-password")
    assert status == 503, body
    assert "service account" in body["error"]


def test_disabled_user_is_refused(make_client: MakeClient, slapd: Slapd, db: Session) -> None:
    client = make_client(server={"ldap": ldap_section(slapd)})
    status, body = ldap_login(client, "alice", "alice-password")
    assert status == 200
    user = db.get(User, body["user"]["id"])
    assert user is not None
    user.enabled = False
    db.commit()
    fresh = make_client(server={"ldap": ldap_section(slapd)})
    status, body = ldap_login(fresh, "alice", "alice-password")
    assert status == 403, body
    assert body["error"] == "this account is disabled"
    assert fresh.get("/api/v1/me").status_code == 401
    # the old session ended with it too
    assert client.get("/api/v1/me").status_code == 401


def test_server_down_or_silent_is_503_within_the_timeout(make_client: MakeClient) -> None:
    closed = make_client(server={"ldap": {
        "enabled": True, "uri": f"ldap://127.0.0.1:{free_port()}/",
        "bind_dn_template": TEMPLATE, "timeout": 2}})
    status, body = ldap_login(closed, "alice", "alice-password")
    assert status == 503, body
    # a server that accepts the connection and never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        hanging = make_client(server={"ldap": {
            "enabled": True, "uri": f"ldap://127.0.0.1:{port}/",
            "bind_dn_template": TEMPLATE, "timeout": 1}})
        started = time.monotonic()
        status, body = ldap_login(hanging, "alice", "alice-password")
        elapsed = time.monotonic() - started
    assert status == 503, body
    assert elapsed < 4


def test_username_taken_by_a_local_user_gets_a_distinct_name(
        make_client: MakeClient, slapd: Slapd, keys: Keys, db: Session) -> None:
    local = keys.user("alice", Role.admin, password="local-password-1")
    client = make_client(server={"ldap": ldap_section(slapd)})
    status, body = ldap_login(client, "alice", "alice-password")
    assert status == 200, body
    assert body["user"]["username"] == "alice-ldap"
    assert body["user"]["role"] == "read-only"
    assert body["user"]["id"] != local.id
    # the local admin is untouched, and the directory password does not open it
    response = make_client().post("/api/v1/auth/login", json={
        "username": "alice", "password": "alice-password"})
    assert response.status_code == 401
    assert make_client().post("/api/v1/auth/login", json={
        "username": "alice", "password": "local-password-1"}).status_code == 200


def test_ldap_users_have_no_local_password(make_client: MakeClient, slapd: Slapd,
                                           db: Session) -> None:
    client = make_client(server={"ldap": ldap_section(slapd)})
    status, body = ldap_login(client, "bob", "bob-password")
    assert status == 200
    response = client.post("/api/v1/me/password", json={
        "current_password": "", "new_password": "a-local-password"},
        headers={"X-CSRFToken": body["csrf_token"]})
    assert response.status_code == 400
    assert "managed by ldap" in response.get_json()["error"]
    user = db.get(User, body["user"]["id"])
    assert user is not None
    assert user.password_hash is None
    # the local login path never accepts an LDAP user, even with a local hash that matches
    user.password_hash = passwords.hash_password("bob-password")
    db.commit()
    assert make_client().post("/api/v1/auth/login", json={
        "username": "bob", "password": "bob-password"}).status_code == 401


def test_ldap_login_is_rate_limited_and_404_when_disabled(
        make_client: MakeClient, slapd: Slapd) -> None:
    limited = make_client(server={"ldap": ldap_section(slapd), "rate_limit_login": "2/minute"})
    assert ldap_login(limited, "alice", "wrong")[0] == 401
    assert ldap_login(limited, "alice", "wrong")[0] == 401
    status, body = ldap_login(limited, "alice", "alice-password")
    assert status == 429, body
    disabled = make_client()
    status, body = ldap_login(disabled, "alice", "alice-password")
    assert status == 404
    assert "not enabled" in body["error"]


def test_dashboard_login_form_offers_ldap(make_client: MakeClient, slapd: Slapd) -> None:
    client = make_client(server={"ldap": ldap_section(slapd)})
    page = client.get("/login?next=/projects")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'value="ldap" selected' in html
    token = html.split('name="csrf_token" value="')[1].split('"')[0]
    form = {"csrf_token": token, "username": "erin", "password": "wrong", "method": "ldap",
            "next": "/projects"}
    response = client.post("/login", data=form)
    assert response.status_code == 401
    assert "Invalid username or password." in response.get_data(as_text=True)
    response = client.post("/login", data={**form, "password": "erin-password"})
    assert response.status_code == 302
    assert response.headers["Location"] == "/projects"
    assert client.get("/api/v1/me").get_json()["user_type"] == "ldap"
    # without LDAP the form has no choice and posts are local logins
    plain = make_client().get("/login").get_data(as_text=True)
    assert 'name="method"' not in plain


def test_directory_groups_decide_the_role_at_every_login(
        make_client: MakeClient, slapd: Slapd, db: Session) -> None:
    groups = {f"cn=circus-admins,{GROUPS}": "admin",
              # DNs compare without regard to case, as the directory does
              f"CN=Circus-Restarters,{GROUPS.upper()}": "restart-jobs"}
    section = ldap_section(slapd, group_roles=groups, group_search_base=GROUPS)

    def role_after_login(uid: str) -> Role:
        # a fresh browser each time (a logged-in one would need a CSRF token)
        status, _ = ldap_login(make_client(server={"ldap": section}), uid, f"{uid}-password")
        assert status == 200
        user = db.scalar(select(User).where(User.username == uid))
        assert user is not None
        db.refresh(user)
        return user.role

    # the first listed group wins; no group: default_role
    assert role_after_login("alice") is Role.admin
    assert role_after_login("bob") is Role.restart_jobs
    assert role_after_login("carol") is Role.read_only

    root = ldap.initialize(slapd.uri)
    root.simple_bind_s(ROOT_DN, ROOT_PASSWORD)
    admins = f"cn=circus-admins,{GROUPS}".encode()
    alice = f"uid=alice,{PEOPLE}".encode()
    root.modify_s(admins.decode(), [(ldap.MOD_DELETE, "member", [alice])])
    try:
        # removed from the admins in the directory: the next login drops the role
        assert role_after_login("alice") is Role.restart_jobs
        change = db.scalar(select(AuditLog).where(AuditLog.action == "user.update",
                                                  AuditLog.target == "user:alice"))
        assert change is not None
        assert change.details["previous_role"] == "admin"
    finally:
        root.modify_s(admins.decode(), [(ldap.MOD_ADD, "member", [alice])])
        root.unbind_s()


def test_group_roles_need_a_search_base() -> None:
    from circus.common.config import ConfigError, load_settings

    with pytest.raises(ConfigError,
                       match=r"server\.ldap\.group_search_base: is required when group_roles"):
        load_settings(files=[], environ={}, overrides={"server": {"ldap": {
            "enabled": True, "uri": "ldap://x", "bind_dn_template": TEMPLATE,
            "group_roles": {"cn=g,dc=x": "admin"}}}})


def test_search_then_bind_finds_the_entry_first(make_client: MakeClient, slapd: Slapd,
                                                db: Session) -> None:
    def status(username: str, password: str, **ldap_config: object) -> int:
        section = {**ldap_section(slapd), "bind_dn_template": "",
                   "user_search_base": PEOPLE, **ldap_config}
        return ldap_login(make_client(server={"ldap": section}), username, password)[0]

    # anonymous search by uid: the same user as a template bind would give
    assert status("alice", "alice-password") == 200
    alice = db.scalar(select(User).where(User.username == "alice"))
    assert alice is not None
    assert alice.external_id == f"uid=alice,{PEOPLE}".lower()
    # by an attribute only the service account may read (mail), logging in with it
    reader = {"user_filter": "(mail={username})", "bind_dn": READER_DN,
              "bind_password": READER_PASSWORD}
    assert status("bob@example.org", "bob-password", **reader) == 200
    bob = db.scalar(select(User).where(User.external_id == f"uid=bob,{PEOPLE}".lower()))
    assert bob is not None
    assert status("bob@example.org", "wrong", **reader) == 401
    assert status("nobody", "x") == 401
    # the filter is escaped: '*' is no wildcard
    assert status("*", "alice-password") == 401
    # a filter that matches several entries is no login either
    assert status("alice", "alice-password",
                  user_filter="(|(uid={username})(objectClass=inetOrgPerson))") == 401
