"""Sessions, CSRF, API keys, anonymous reads, rate limits and security headers."""

from __future__ import annotations

import gc
import hashlib
import secrets
from collections.abc import Callable

from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from circus.auth import passwords
from circus.auth.tokens import digest
from circus.common.config import Settings
from circus.common.enums import Role
from circus.common.models import ApiKey, AuditLog, User, UserSession
from tests.api.conftest import Keys, make_app

PASSWORD = "correct horse battery"


def login(client: FlaskClient, username: str = "alice", password: str = PASSWORD) -> str:
    response = client.post("/api/v1/auth/login", json={"username": username,
                                                       "password": password})
    assert response.status_code == 200, response.get_json()
    return str(response.get_json()["csrf_token"])


def test_passwords_are_argon2id(keys: Keys) -> None:
    user = keys.user("alice", password=PASSWORD)
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$")
    assert passwords.verify_password(user.password_hash, PASSWORD)
    assert not passwords.verify_password(user.password_hash, "wrong password")


def test_session_login_logout(client: FlaskClient, keys: Keys, db: Session) -> None:
    keys.user("alice", Role.create_projects, password=PASSWORD)
    assert client.post("/api/v1/auth/login", json={"username": "alice", "password": "nope"}
                       ).status_code == 401
    csrf = login(client)
    cookie = client.get_cookie("circus_session")
    assert cookie is not None
    assert cookie.http_only
    assert cookie.same_site == "Lax"
    me = client.get("/api/v1/me").get_json()
    assert me["username"] == "alice"
    assert me["auth"] == "session"
    # the database holds only the token's SHA-256
    token_hashes = db.scalars(select(UserSession.token_hash)).all()
    assert len(token_hashes) == 1
    assert len(token_hashes[0]) == 64

    response = client.post("/api/v1/projects", json={"name": "p1"},
                           headers={"X-CSRFToken": csrf})
    assert response.status_code == 201, response.get_json()
    assert client.post("/api/v1/auth/logout", headers={"X-CSRFToken": csrf}).status_code == 204
    assert db.scalars(select(UserSession)).all() == []
    assert client.get("/api/v1/me").status_code == 401
    actions = db.scalars(select(AuditLog.action).where(AuditLog.action.startswith("auth."))
                         .order_by(AuditLog.id)).all()
    assert actions == ["auth.login_failed", "auth.login", "auth.logout"]


def test_session_mutation_without_csrf_token_is_rejected(client: FlaskClient, keys: Keys
                                                         ) -> None:
    keys.user("alice", Role.admin, password=PASSWORD)
    login(client)
    response = client.post("/api/v1/projects", json={"name": "p1"})
    assert response.status_code == 400
    assert "CSRF" in response.get_json()["error"]
    response = client.post("/api/v1/projects", json={"name": "p1"},
                           headers={"X-CSRFToken": "forged"})
    assert response.status_code == 400


def test_form_post_without_csrf_token_is_rejected(client: FlaskClient, keys: Keys) -> None:
    keys.user("alice", password=PASSWORD)
    response = client.post("/api/v1/auth/login",
                           data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 400
    assert "CSRF" in response.get_json()["error"]
    assert client.get("/api/v1/me").status_code == 401
    token = client.get("/api/v1/auth/csrf").get_json()["csrf_token"]
    response = client.post("/api/v1/auth/login", data={
        "username": "alice", "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 200
    assert client.get("/api/v1/me").get_json()["username"] == "alice"


def test_bearer_calls_need_no_csrf_token(client: FlaskClient, keys: Keys) -> None:
    headers = keys.headers(Role.create_projects)
    assert client.post("/api/v1/projects", json={"name": "p1"}, headers=headers
                       ).status_code == 201


def test_key_revocation_takes_effect_at_once(client: FlaskClient, keys: Keys,
                                             db: Session) -> None:
    user = keys.user("alice", Role.admin)
    headers = keys.headers(Role.admin, owner=user, name="ci")
    listing = client.get("/api/v1/api-keys", headers=headers).get_json()
    key_id = listing["items"][0]["id"]
    assert client.get("/api/v1/projects", headers=headers).status_code == 200
    assert client.delete(f"/api/v1/api-keys/{key_id}", headers=headers).status_code == 204
    response = client.get("/api/v1/projects", headers=headers)
    assert response.status_code == 401
    assert "revoked" in response.get_json()["error"]


def test_api_keys_are_hashed_and_shown_once(client: FlaskClient, keys: Keys,
                                            db: Session) -> None:
    user = keys.user("alice", Role.bump_to_front)
    headers = keys.headers(Role.bump_to_front, owner=user)
    response = client.post("/api/v1/api-keys", headers=headers, json={"name": "mine"})
    assert response.status_code == 201
    created = response.get_json()
    secret = created["key"]
    assert created["role"] == "bump-to-front"
    assert created["owner_id"] == user.id
    row = db.get(ApiKey, created["id"])
    assert row is not None
    assert row.key_hash == digest(secret)
    assert secret not in row.key_hash
    shown = client.get(f"/api/v1/api-keys/{created['id']}", headers=headers).get_json()
    assert "key" not in shown
    assert shown["key_prefix"] == secret[:12]
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).get_json()
    assert me["username"] == "alice"
    assert me["auth"] == "api_key"
    # a non-admin cannot mint a more powerful key, nor one for someone else
    assert client.post("/api/v1/api-keys", headers=headers,
                       json={"name": "x", "role": "admin"}).status_code == 403
    assert client.post("/api/v1/api-keys", headers=headers,
                       json={"name": "x", "owner_id": user.id + 1000}).status_code == 403
    assert client.post("/api/v1/api-keys", headers=headers,
                       json={"name": "ro", "role": "read-only"}).status_code == 201


def test_disabled_users_keys_stop_working(client: FlaskClient, keys: Keys, admin: dict[str, str]
                                          ) -> None:
    user = keys.user("alice")
    headers = keys.headers(Role.read_only, owner=user)
    assert client.get("/api/v1/projects", headers=headers).status_code == 200
    assert client.put(f"/api/v1/users/{user.id}", headers=admin, json={"enabled": False}
                      ).status_code == 200
    assert client.get("/api/v1/projects", headers=headers).status_code == 401


def test_anonymous_reads_follow_require_api_key_for_reads(
        make_settings: Callable[..., Settings], engine: Engine, db: Session) -> None:
    closed = make_app(make_settings(), engine, db).test_client()
    response = closed.get("/api/v1/projects")
    assert response.status_code == 401
    assert set(response.get_json()) == {"error", "details"}
    assert closed.get("/api/v1/openapi.json").status_code == 200
    assert closed.get("/health").status_code in (200, 503)
    open_ = make_app(make_settings(server={"require_api_key_for_reads": False}), engine,
                     db).test_client()
    assert open_.get("/api/v1/projects").status_code == 200
    assert open_.get("/api/v1/builds").status_code == 200
    # mutations still need credentials
    assert open_.post("/api/v1/projects", json={"name": "x"}).status_code == 401
    # an invalid key is an error even where anonymous reads are allowed
    assert open_.get("/api/v1/projects", headers={"Authorization": "Bearer nope"}
                     ).status_code == 401


def test_login_is_rate_limited_per_ip(make_settings: Callable[..., Settings], engine: Engine,
                                      db: Session) -> None:
    client = make_app(make_settings(server={"rate_limit_login": "3/minute"}), engine,
                      db).test_client()
    statuses = [client.post("/api/v1/auth/login", json={"username": "x", "password": "y"}
                            ).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    response = client.post("/api/v1/auth/login", json={"username": "x", "password": "y"})
    assert response.get_json()["error"]
    assert response.headers.get("Retry-After")
    other_ip = client.post("/api/v1/auth/login", json={"username": "x", "password": "y"},
                           environ_base={"REMOTE_ADDR": "127.0.0.9"})
    assert other_ip.status_code == 401


def test_logins_work_with_rate_limits_turned_off(make_settings: Callable[..., Settings],
                                                engine: Engine, db: Session, keys: Keys
                                                ) -> None:
    # flask-limiter keeps a disabled limiter nowhere but in weak references from the login
    # views it wrapped: once the garbage collector took it, every login was a 500
    keys.user("alice", password=PASSWORD)
    client = make_app(make_settings(server={"rate_limit_enabled": False}), engine,
                      db).test_client()
    gc.collect()
    assert client.post("/api/v1/auth/login", json={"username": "alice", "password": "nope"}
                       ).status_code == 401
    assert login(client)
    callback = client.get("/api/v1/auth/github/callback?code=x&state=y")
    assert callback.status_code < 500, callback.get_data()


def test_api_is_rate_limited(make_settings: Callable[..., Settings], engine: Engine,
                             db: Session, keys: Keys) -> None:
    client = make_app(make_settings(server={"rate_limit_api": "5/minute"}), engine,
                      db).test_client()
    headers = keys.headers()
    statuses = [client.get("/api/v1/projects", headers=headers).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert client.get("/health").status_code in (200, 503)


def test_remote_workers_spend_a_budget_of_their_own(
        make_settings: Callable[..., Settings], engine: Engine, db: Session,
        keys: Keys) -> None:
    """A worker's calls do not count against its address's API budget (a host with
    many slots of short builds calls a lot) but against its own; a wrong token gets no
    worker budget."""
    token = "worker-token-" + secrets.token_hex(20)
    client = make_app(make_settings(
        server={"rate_limit_api": "3/minute"},
        remote_workers={"auth_tokens": [hashlib.sha256(token.encode()).hexdigest()],
                        "rate_limit": "6/minute"}), engine, db).test_client()

    def beat(name: str, bearer: str = token) -> int:
        return client.post("/api/v1/workers/heartbeat", json={"systems": ["x86_64-linux"]},
                           headers={"Authorization": f"Bearer {bearer}",
                                    "X-Circus-Worker": name}).status_code

    # the address spends its API budget...
    assert [client.get("/api/v1/projects", headers=keys.headers()).status_code
            for _ in range(4)] == [200] * 3 + [429]
    # ...while the worker from that address keeps going, until its own budget is spent
    assert [beat("w1") for _ in range(7)] == [200] * 6 + [429]
    # another worker (name) has a budget of its own
    assert beat("w2") == 200
    # a wrong token is just another caller of this address: no worker budget
    assert beat("w3", bearer="worker-token-" + "x" * 40) == 429
    # and with budget left, wrong tokens spend the address's (401, then 429), not a
    # worker's
    client = make_app(make_settings(
        server={"rate_limit_api": "1/minute"},
        remote_workers={"auth_tokens": [hashlib.sha256(token.encode()).hexdigest()],
                        "rate_limit": "6/minute"}), engine, db).test_client()
    assert [beat("w1", bearer="nope") for _ in range(2)] == [401, 429]
    assert beat("w1") == 200


def test_rate_limits_are_shared_by_every_server_process(
        make_settings: Callable[..., Settings], engine: Engine, db: Session, keys: Keys,
        redis_url: str) -> None:
    """Two apps (two gunicorn workers, or two hosts) count one budget in the broker's
    Redis; the test's own address keeps it apart from other tests' counts."""
    import redis

    from circus.server.security import limits_storage

    settings = make_settings(server={"rate_limit_api": "4/minute", "rate_limit_storage": None})
    first, second = (make_app(settings, engine, db).test_client() for _ in range(2))
    headers = keys.headers()
    address = {"REMOTE_ADDR": f"127.0.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}"}
    statuses = [client.get("/api/v1/projects", headers=headers, environ_base=address)
                .status_code for client in (first, second, first, second, first)]
    assert statuses == [200, 200, 200, 200, 429]
    assert limits_storage(redis_url).startswith("redis")
    assert limits_storage("amqp://guest@localhost//") == "memory://"
    client = redis.Redis.from_url(redis_url.replace("redis+socket://", "unix://"))
    assert client.keys("*circus-limits*")


def test_security_headers_cors_and_body_limit(make_settings: Callable[..., Settings],
                                              engine: Engine, db: Session, keys: Keys) -> None:
    settings = make_settings(server={"allowed_origins": ["https://ok.example"],
                                     "max_body_size": 1024, "force_secure_cookies": True})
    client = make_app(settings, engine, db).test_client()
    headers = keys.headers()
    response = client.get("/api/v1/projects", headers={**headers,
                                                       "Origin": "https://ok.example"})
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert response.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    evil = client.get("/api/v1/projects", headers={**headers, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    big = client.post("/api/v1/projects", headers=headers,
                      json={"name": "x", "description": "y" * 5000})
    assert big.status_code == 413
    assert "error" in big.get_json()


def test_secure_cookie_flag(make_settings: Callable[..., Settings], engine: Engine,
                            db: Session, keys: Keys) -> None:
    keys.user("alice", password=PASSWORD)
    client = make_app(make_settings(server={"force_secure_cookies": True}), engine,
                      db).test_client()
    client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD},
                base_url="https://localhost")
    cookie = client.get_cookie("circus_session", domain="localhost")
    assert cookie is not None
    assert cookie.secure


def test_me_and_password_change(client: FlaskClient, keys: Keys, db: Session) -> None:
    keys.user("alice", password=PASSWORD)
    csrf = login(client)
    response = client.put("/api/v1/me", json={"full_name": "Alice A"},
                          headers={"X-CSRFToken": csrf})
    assert response.status_code == 200
    assert response.get_json()["full_name"] == "Alice A"
    assert client.post("/api/v1/me/password", headers={"X-CSRFToken": csrf}, json={
        "current_password": "wrong", "new_password": "whatever123"}).status_code == 403
    assert client.post("/api/v1/me/password", headers={"X-CSRFToken": csrf}, json={
        "current_password": PASSWORD, "new_password": "short"}).status_code == 400
    assert client.post("/api/v1/me/password", headers={"X-CSRFToken": csrf}, json={
        "current_password": PASSWORD, "new_password": "a new password"}).status_code == 204
    # a password change ends every session
    assert client.get("/api/v1/me").status_code == 401
    user = db.scalar(select(User).where(User.username == "alice"))
    db.refresh(user)
    assert user is not None
    assert passwords.verify_password(user.password_hash, "a new password")
