"""A private OpenLDAP ``slapd`` for tests: generated config, data, TLS certificates.

Listens on a free port on 127.0.0.1 (plain LDAP with StartTLS, certificate
issued by a test CA for ``127.0.0.1``/``localhost``). Never touches the
system's slapd: config, database and pid file live in the given directory.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.daemons import Daemon
from tests.helpers.net import free_port, wait_for_port

BASE = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE}"
TEMPLATE = f"uid={{username}},{PEOPLE}"
#: the service account that may read ``mail`` (users may not read their own)
READER_DN = f"cn=reader,{BASE}"
READER_PASSWORD = "reader-secret"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PASSWORD = "root-secret"

#: uid → (password, cn, mail)
PEOPLE_ENTRIES = {
    "alice": ("alice-password", "Alice Liddell", "alice@example.org"),
    "bob": ("bob-password", "Bob Builder", "bob@example.org"),
    "carol": ("carol-password", "Carol Danvers", "carol@example.org"),
    "dave": ("dave-password", "Dave Lister", "dave@example.org"),
    "erin": ("erin-password", "Erin Brockovich", "erin@example.org"),
}
GROUPS = f"ou=groups,{BASE}"
#: group cn → members (uids)
GROUP_ENTRIES = {"circus-admins": ["alice", "erin"], "circus-restarters": ["alice", "bob"]}
#: an entry *below* alice: what an unescaped ``robot,uid=alice`` would bind as
ROBOT_DN = f"uid=robot,uid=alice,{PEOPLE}"
ROBOT_PASSWORD = "robot-password"


@dataclass
class Slapd:
    uri: str
    #: the same server over TLS from the first byte
    ldaps_uri: str
    ca_file: Path
    other_ca_file: Path
    daemon: Daemon


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> None:
    """A test CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem",
                 "-days", "2", "-subj", f"/CN=Circus test {name}", cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=directory)
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=directory)


def _ldif() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: reader\nuserPassword: {READER_PASSWORD}",
    ]
    for uid, (password, cn, mail) in PEOPLE_ENTRIES.items():
        entries.append(f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
                       f"cn: {cn}\nsn: {cn.split()[-1]}\nmail: {mail}\nuserPassword: {password}")
    entries.append(f"dn: {ROBOT_DN}\nobjectClass: inetOrgPerson\nuid: robot\ncn: Robot\n"
                   f"sn: Robot\nuserPassword: {ROBOT_PASSWORD}")
    entries.append(f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups")
    for cn, members in GROUP_ENTRIES.items():
        entries.append(f"dn: cn={cn},{GROUPS}\nobjectClass: groupOfNames\ncn: {cn}\n" + "\n".join(
            f"member: uid={uid},{PEOPLE}" for uid in members))
    return "\n\n".join(entries) + "\n"


def _config(directory: Path) -> str:
    return f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args
TLSCACertificateFile {directory}/ca.pem
TLSCertificateFile {directory}/server.pem
TLSCertificateKeyFile {directory}/server.key
database mdb
suffix "{BASE}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {directory}/db
maxsize 10485760
access to attrs=userPassword by anonymous auth by * none
access to attrs=mail by dn.exact="{READER_DN}" read by * none
access to * by * read
"""


def start_slapd(directory: Path) -> Slapd:
    directory.mkdir(parents=True, exist_ok=True)
    make_certificates(directory)
    (directory / "db").mkdir()
    config = directory / "slapd.conf"
    config.write_text(_config(directory))
    (directory / "data.ldif").write_text(_ldif())
    subprocess.run(["slapadd", "-f", str(config), "-l", str(directory / "data.ldif")],
                   check=True, capture_output=True)
    port, tls_port = free_port(), free_port()
    uri, ldaps_uri = f"ldap://127.0.0.1:{port}/", f"ldaps://127.0.0.1:{tls_port}/"
    # -d 0: stay in the foreground (the Daemon owns the process group), log nothing
    daemon = Daemon("slapd", ["slapd", "-f", str(config), "-h", f"{uri} {ldaps_uri}",
                              "-d", "0"], directory)
    daemon.start()
    try:
        wait_for_port(port, timeout=30)
        wait_for_port(tls_port, timeout=30)
    except TimeoutError as exc:
        daemon.stop()
        raise AssertionError(f"slapd did not start:\n{daemon.log()}") from exc
    return Slapd(uri, ldaps_uri, directory / "ca.pem", directory / "other-ca.pem", daemon)
