"""Agents authenticated by GitHub Actions ID tokens, against a local OIDC issuer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from joserfc.jwk import RSAKey
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import OidcSettings, Settings
from circus.gateway import oidc
from circus.gateway.oidc import OidcRejected, OidcVerifier
from circus.gateway.runtime import GatewayThread
from tests.agents.conftest import TOKEN_DIGEST
from tests.agents.test_registration import raw_register
from tests.helpers.oidc_issuer import OidcIssuer, claims_for, oidc_issuer


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with oidc_issuer() as running:
        yield running


def verifier(issuer: OidcIssuer, **overrides: Any) -> OidcVerifier:
    config: dict[str, Any] = {"issuer": issuer.url, "audiences": ["circus"],
                              "allowed_repositories": ["acme/widget"], **overrides}
    return OidcVerifier(OidcSettings(**config))


def test_a_valid_token_names_its_repository(issuer: OidcIssuer) -> None:
    identity = verifier(issuer).verify(issuer.token())
    assert identity.repository == "acme/widget"
    assert identity.subject == "repo:acme/widget:ref:refs/heads/main"
    assert identity.ref == "refs/heads/main"
    # keys came from the jwks_uri the discovery document names
    assert issuer.requests[:2] == ["/.well-known/openid-configuration", "/.well-known/jwks"]


@pytest.mark.parametrize(("claims", "reason"), [
    ({"aud": "someone-else"}, "'aud'"),
    ({"exp": int(time.time()) - 300}, "expired"),
    ({"iss": "https://token.example.org"}, "'iss'"),
    (claims_for("evil/widget"), "repository 'evil/widget' is not allowed"),
])
def test_bad_claims_are_refused(issuer: OidcIssuer, claims: dict[str, Any], reason: str
                                ) -> None:
    with pytest.raises(OidcRejected, match=reason):
        verifier(issuer).verify(issuer.token(**claims))


def test_a_forged_signature_is_refused(issuer: OidcIssuer) -> None:
    forger = RSAKey.generate_key(2048, parameters={"kid": "key-1"})
    with pytest.raises(OidcRejected, match="signature"):
        verifier(issuer).verify(issuer.token(key=forger))
    with pytest.raises(OidcRejected, match="malformed"):
        verifier(issuer).verify("eyJhbGciOi.not-json.x")


def test_subject_workflow_and_ref_allowlists(issuer: OidcIssuer) -> None:
    strict = verifier(issuer, allowed_subject_prefixes=["repo:acme/widget:ref:refs/heads/"],
                      allowed_refs=["refs/heads/main"],
                      allowed_workflow_refs=[
                          "acme/widget/.github/workflows/ci.yml@refs/heads/main"])
    assert strict.verify(issuer.token()).repository == "acme/widget"
    with pytest.raises(OidcRejected, match="subject 'repo:acme/widget:pull_request'"):
        strict.verify(issuer.token(sub="repo:acme/widget:pull_request"))
    with pytest.raises(OidcRejected, match="ref 'refs/heads/dev' is not allowed"):
        strict.verify(issuer.token(sub="repo:acme/widget:ref:refs/heads/dev",
                                   ref="refs/heads/dev"))
    with pytest.raises(OidcRejected, match="workflow"):
        strict.verify(issuer.token(job_workflow_ref="acme/widget/.github/workflows/x.yml@x"))


def test_rotated_keys_are_fetched_again(issuer: OidcIssuer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    check = verifier(issuer, jwks_url=f"{issuer.url}/.well-known/jwks")
    assert check.verify(issuer.token()).repository == "acme/widget"
    fetched = issuer.requests.count("/.well-known/jwks")
    monkeypatch.setattr(oidc, "REFETCH_AFTER_SECS", 0.0)
    issuer.rotate()
    assert check.verify(issuer.token()).repository == "acme/widget"
    assert issuer.requests.count("/.well-known/jwks") == fetched + 1
    assert "/.well-known/openid-configuration" not in issuer.requests  # jwks_url given


def test_the_gateway_accepts_oidc_agents_and_refuses_bad_tokens(
        issuer: OidcIssuer, make_settings: Callable[..., Settings],
        committed_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(queue_runner={"rpc": {
        "bind": "127.0.0.1:0", "allow_plaintext": True, "auth_tokens": [TOKEN_DIGEST],
        "oidc": {"issuer": issuer.url, "audiences": ["circus"],
                 "allowed_repositories": ["acme/widget"]}}})
    thread = GatewayThread(settings, committed_db)
    thread.start()
    assert thread.started.wait(20)
    try:
        assert raw_register(thread.port, authToken=issuer.token(), name="gh-runner") == ""
        refusal = raw_register(thread.port, authToken=issuer.token(**claims_for("evil/x")),
                               name="evil-runner")
        assert "refused: OIDC token rejected: repository 'evil/x' is not allowed" in refusal
        assert "evil/x" in caplog.text
        # bearer tokens keep working next to OIDC
        assert raw_register(thread.port, name="plain") == ""
    finally:
        thread.stop()
    with committed_db() as session:
        kinds = dict(session.execute(text(
            "SELECT name, auth_kind FROM builder_sessions")).tuples().all())
    assert kinds == {"gh-runner": "oidc", "plain": "token"}
