"""LDAP logins: a simple bind as ``bind_dn_template`` with ``{username}`` filled in,
or (``user_search_base``) as the one entry ``user_filter`` finds.

The username is escaped with ``ldap.dn.escape_dn_chars`` before it goes into the
DN, so ``admin,dc=evil`` or ``x+uid=admin`` name a (non-existent) entry below
the template's base instead of another entry; in a search filter it is escaped
with ``ldap.filter.escape_filter_chars`` (``*`` matches nothing but a ``*``).
A search that finds no entry or several is a failed login. An empty password is refused
before the directory is asked: to LDAP a simple bind without a password is an
anonymous bind, which many servers accept.

Outcomes are Circus errors: wrong password or no such entry → ``Unauthenticated``
(the same message for both), server down, TLS failure or a timeout →
``Unavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ldap
import ldap.dn
import ldap.filter

from circus.auth.external import ExternalIdentity
from circus.common.config import LdapSettings
from circus.common.enums import Role, UserType
from circus.common.errors import InvalidInput, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

#: attributes read from the user's entry for a new user's profile
PROFILE_ATTRIBUTES = ("mail", "displayName", "cn")
MAX_USERNAME = 256
MAX_PASSWORD = 4096
BAD_CREDENTIALS = "invalid username or password"


def bind_dn(config: LdapSettings, username: str) -> str:
    """The DN to bind as: the template with the escaped username."""
    return config.bind_dn_template.replace("{username}", ldap.dn.escape_dn_chars(username))


def authenticate(config: LdapSettings, username: str, password: str) -> ExternalIdentity:
    """Bind as ``username``; returns who the directory says that is."""
    username = username.strip()
    if not username or not password:
        raise Unauthenticated(BAD_CREDENTIALS)
    if len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD or "\x00" in username:
        raise InvalidInput("username or password too long or malformed")
    conn = connect(config)
    try:
        dn = find_user_dn(conn, config, username) if config.user_search_base \
            else bind_dn(config, username)
        try:
            conn.simple_bind_s(dn, password)
        except (ldap.INVALID_CREDENTIALS, ldap.INVALID_DN_SYNTAX, ldap.NO_SUCH_OBJECT,
                ldap.UNWILLING_TO_PERFORM, ldap.INAPPROPRIATE_AUTH) as exc:
            log.info("LDAP bind as %s refused: %s", dn, _describe(exc))
            raise Unauthenticated(BAD_CREDENTIALS) from exc
        except ldap.LDAPError as exc:
            raise _unavailable(exc) from exc
        entry_dn, attrs = _read_entry(conn, config, dn)
        role = group_role(conn, config, entry_dn, username) if config.group_roles else None
    finally:
        _unbind(conn)
    return ExternalIdentity(user_type=UserType.ldap, external_id=normalise_dn(entry_dn),
                            username=username, email=_first(attrs, "mail"),
                            full_name=_first(attrs, "displayName") or _first(attrs, "cn"),
                            role=role)


def group_role(conn: Any, config: LdapSettings, entry_dn: str, username: str) -> Role:
    """The role of the first ``group_roles`` group the user is a member of, else
    ``default_role`` (searched as the service account when one is configured)."""
    query = config.group_filter.replace("{dn}", ldap.filter.escape_filter_chars(entry_dn)) \
        .replace("{username}", ldap.filter.escape_filter_chars(username))
    try:
        found = conn.search_s(config.group_search_base, ldap.SCOPE_SUBTREE, query, ["1.1"])
    except ldap.LDAPError as exc:
        # a role decided without the groups could grant or remove rights wrongly
        raise _unavailable(exc) from exc
    member_of = {normalise_dn(str(group_dn)) for group_dn, _ in found if group_dn}
    for group, role in config.group_roles.items():
        if normalise_dn(group) in member_of:
            return role
    return config.default_role


@dataclass(frozen=True)
class DirectoryEntry:
    """What the directory says of a user now (:func:`read_users`)."""

    exists: bool
    #: the role its groups grant (``group_roles``); None without ``group_roles``
    role: Role | None = None


def read_users(config: LdapSettings, users: Sequence[tuple[str, str]]
               ) -> dict[str, DirectoryEntry]:
    """Each ``(entry DN, username)``'s entry and groups as the directory holds them now,
    read as the service account (``bind_dn``) or anonymously, by DN. A DN the directory
    cannot parse (a bind name such as ``alice@example.org``) is left out: nothing is
    known of it. Raises :class:`Unavailable` when the directory does not answer."""
    conn = connect(config)
    try:
        try:
            _bind_service_account(conn, config)
        except ldap.LDAPError as exc:
            raise _unavailable(exc) from exc
        seen: dict[str, DirectoryEntry] = {}
        for dn, username in users:
            try:
                found = conn.search_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"])
            except ldap.NO_SUCH_OBJECT:
                seen[dn] = DirectoryEntry(exists=False)
                continue
            except (ldap.INVALID_DN_SYNTAX, ldap.DECODING_ERROR):
                continue
            except ldap.LDAPError as exc:
                raise _unavailable(exc) from exc
            if not any(entry_dn for entry_dn, _ in found):
                seen[dn] = DirectoryEntry(exists=False)
                continue
            seen[dn] = DirectoryEntry(exists=True, role=group_role(
                conn, config, dn, username) if config.group_roles else None)
        return seen
    finally:
        _unbind(conn)


def _bind_service_account(conn: Any, config: LdapSettings) -> None:
    """Bind as ``bind_dn`` when one is configured (else stay as bound, or anonymous);
    a refused service account is the server's misconfiguration, not a failed login."""
    if not (config.bind_dn and config.bind_password):
        return
    try:
        conn.simple_bind_s(config.bind_dn, config.bind_password)
    except ldap.INVALID_CREDENTIALS as exc:
        raise Unavailable("the directory refused Circus's service account (server.ldap.bind_dn"
                          " and bind_password)") from exc


def find_user_dn(conn: Any, config: LdapSettings, username: str) -> str:
    """Search-then-bind: the one entry ``user_filter`` finds under ``user_search_base``
    (searched as the service account, or anonymously without one)."""
    query = config.user_filter.replace("{username}", ldap.filter.escape_filter_chars(username))
    try:
        _bind_service_account(conn, config)
        found = conn.search_s(config.user_search_base, ldap.SCOPE_SUBTREE, query, ["1.1"])
    except ldap.LDAPError as exc:
        raise _unavailable(exc) from exc
    entries = [str(dn) for dn, _ in found if dn]
    if len(entries) != 1:
        # none, or ambiguous: both are a failed login, said the same way
        log.info("LDAP search for %r found %d entries", username, len(entries))
        raise Unauthenticated(BAD_CREDENTIALS)
    return entries[0]


def connect(config: LdapSettings) -> Any:
    """A connection with timeouts and TLS set up (StartTLS done when configured)."""
    try:
        conn = ldap.initialize(config.uri)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
        # referrals would send the user's password to another server
        conn.set_option(ldap.OPT_REFERRALS, 0)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, float(config.timeout))
        conn.set_option(ldap.OPT_TIMEOUT, float(config.timeout))
        # python-ldap's synchronous calls wait for this many seconds (default: forever)
        conn.timeout = config.timeout
        ldaps = config.uri.lower().startswith("ldaps:")
        if config.tls_ca_file or config.start_tls or ldaps:
            if config.tls_ca_file:
                conn.set_option(ldap.OPT_X_TLS_CACERTFILE, config.tls_ca_file)
            conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            # a connection's TLS options take effect only in a new TLS context (set last)
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        if config.start_tls and not ldaps:
            conn.start_tls_s()
    except ldap.LDAPError as exc:
        raise _unavailable(exc) from exc
    return conn


def normalise_dn(dn: str) -> str:
    """One spelling per entry (``UID=Alice, OU=x`` → ``uid=alice,ou=x``): the user's key.

    Directories compare DNs without regard to case (the attribute types always,
    the values of the usual naming attributes too), so neither may make a
    second user. A bind name that is not a DN (``alice@example.org`` on Active
    Directory) is kept as written, lower-cased.
    """
    try:
        parts = ldap.dn.str2dn(dn)
    except ldap.DECODING_ERROR:
        return dn.strip().lower()
    return str(ldap.dn.dn2str(parts)).lower()


def _read_entry(conn: Any, config: LdapSettings, dn: str) -> tuple[str, dict[str, list[bytes]]]:
    """The bound entry's DN as stored, and its profile attributes (best effort).

    Read as the user; with ``bind_password`` (and ``bind_dn``) as the service
    account instead, for directories whose ACLs hide entries from their owners.
    The bind already proved the password, so a failed read costs only the profile.
    """
    try:
        _bind_service_account(conn, config)
        found = conn.search_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", list(PROFILE_ATTRIBUTES))
    except ldap.LDAPError as exc:
        if isinstance(exc, ldap.SERVER_DOWN | ldap.TIMEOUT):
            raise _unavailable(exc) from exc
        log.info("cannot read the LDAP entry %s: %s", dn, _describe(exc))
        return _whoami(conn, dn), {}
    for entry_dn, attrs in found:
        if entry_dn is not None:
            return str(entry_dn), dict(attrs)
    return _whoami(conn, dn), {}


def _whoami(conn: Any, dn: str) -> str:
    try:
        identity = str(conn.whoami_s() or "")
    except ldap.LDAPError:
        return dn
    return identity[3:] if identity.startswith("dn:") else dn


def _first(attrs: dict[str, list[bytes]], name: str) -> str | None:
    for key, values in attrs.items():
        if key.lower() == name.lower() and values:
            text = values[0].decode("utf-8", "replace").strip()
            return text[:256] or None
    return None


def _unavailable(exc: Exception) -> Unavailable:
    log.warning("LDAP server unavailable: %s", _describe(exc))
    return Unavailable("the directory server cannot be reached", {"reason": _describe(exc)})


def _describe(exc: Exception) -> str:
    info: Any = exc.args[0] if exc.args else None
    if isinstance(info, dict):
        parts = [str(info.get("desc", "")), str(info.get("info", ""))]
        return ": ".join(part for part in parts if part) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _unbind(conn: Any) -> None:
    try:
        conn.unbind_s()
    except ldap.LDAPError:
        pass
