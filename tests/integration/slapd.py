"""A throwaway OpenLDAP ``slapd`` for the integration tests.

``start_slapd(workdir)`` writes a ``slapd.conf`` (mdb backend), loads the
test data with ``slapadd``, generates a test CA and a server certificate
with ``cryptography`` and runs slapd in the foreground (so we own its PID)
on two free loopback ports: ``ldap://`` (StartTLS offered) and ``ldaps://``.

Test data (base ``dc=example,dc=org``)::

    ou=people   uid=NAME  inetOrgPerson, userPassword "NAME-pw", cn "NAME",
                          sn "NAME", mail "NAME@example.org",
                          description "secret description of NAME"
                NAME in USERS (below), and in SPECIAL_USERS: "st*r(x)" and
                "zoë" (filter metacharacters, non-ASCII), in no group
                uid=userNNNNN for 1..extra_users, password "passNNNNN"
                (cn "User NNNNN", mail userNNNNN@example.org)
    ou=groups   cn=vpn-users (alice, bob, carol), cn=admins (alice),
                cn=staff (every name in USERS) -- groupOfNames;
                cn=many (every userNNNNN) when extra_users > 0
    ou=services cn=svc (simpleSecurityObject, password "svc-secret")
    rootdn      cn=admin,dc=example,dc=org / "admin-secret"

Users carry ``memberOf`` (the memberof overlay is loaded; slapadd bypasses
overlays, so the values are written into the LDIF directly and the overlay
keeps them up to date for later modifications).

Size limit 500 for everyone but the rootdn, so a search over the 1,200+
extra users only succeeds when paged.

ACLs: ``userPassword`` anonymous auth / self write / nothing else;
``description`` readable by any authenticated DN but not anonymously;
everything else readable by anyone.

The certificate names ``127.0.0.1`` (IP SAN), ``::1`` and ``localhost``.
``make_ca`` is public so tests can make a second, wrong CA.

The config skeleton, ``slapadd`` and the process we own by PID are the
bench's too (:mod:`bench.slapd_harness`): one harness, two data sets.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import pathlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench import slapd_harness as harness
from bench.slapd_harness import SlapdProcess, ssha

BASE_DN = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-secret"
SVC_DN = f"cn=svc,ou=services,{BASE_DN}"
SVC_PASSWORD = "svc-secret"

USERS: tuple[str, ...] = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    "ivan", "judy", "mallory", "oscar", "peggy", "trent", "victor", "walter",
)
SPECIAL_USERS: tuple[str, ...] = ("st*r(x)", "zoë")
# The one user whose userPassword is stored in cleartext: slapd checks SASL PLAIN
# through its auxprop, which compares cleartext only (in no group).
SASL_USER = "paula"
GROUPS: dict[str, tuple[str, ...]] = {
    "vpn-users": ("alice", "bob", "carol"),
    "admins": ("alice",),
    "staff": USERS,
}

START_TIMEOUT = 10.0  # seconds for slapd to answer after launch
START_ATTEMPTS = 3  # fresh ports each time


def user_dn(name: str) -> str:
    return f"uid={name},ou=people,{BASE_DN}"


def group_dn(name: str) -> str:
    return f"cn={name},ou=groups,{BASE_DN}"


def user_password(name: str) -> str:
    """The password of a named user or of an extra ``userNNNNN`` user."""
    if name.startswith("user") and name[4:].isdigit():
        return "pass" + name[4:]
    return f"{name}-pw"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- TLS

SERVER_NAMES: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)



def make_ca(
    directory: pathlib.Path, name: str = "mfa-proxy test CA"
) -> tuple[pathlib.Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Write a self-signed CA certificate; return (PEM path, key, cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / (name.replace(" ", "-") + ".pem")
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(
    directory: pathlib.Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
    names: Sequence[str] = SERVER_NAMES,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a server cert for ``names`` (IP addresses or DNS names) signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([_general_name(name) for name in names])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


# ---------------------------------------------------------------- data


def _line(attribute: str, value: str) -> str:
    """One LDIF line; base64 when the value is not a SAFE-STRING (RFC 2849)."""
    if value.isascii() and not value.startswith((" ", ":", "<")):
        return f"{attribute}: {value}"
    return f"{attribute}:: {base64.b64encode(value.encode()).decode()}"


def _entry(dn: str, *lines: str) -> str:
    return "\n".join((_line("dn", dn), *lines)) + "\n\n"


def _person(uid: str, cn: str, groups: list[str], description: bool,
            cleartext: bool = False) -> str:
    password = user_password(uid) if cleartext else ssha(user_password(uid))
    lines = [
        "objectClass: inetOrgPerson", _line("uid", uid), _line("cn", cn), _line("sn", uid),
        _line("mail", f"{uid}@example.org"),
        *([_line("description", f"secret description of {uid}")] if description else []),
        f"userPassword: {password}",
        *(f"memberOf: {g}" for g in groups),
    ]
    return _entry(user_dn(uid), *lines)


def build_ldif(extra_users: int = 0) -> str:
    groups = dict(GROUPS)
    if extra_users:
        groups["many"] = tuple(f"user{i:05d}" for i in range(1, extra_users + 1))
    memberships: dict[str, list[str]] = {}
    for group, members in groups.items():
        for name in members:
            memberships.setdefault(name, []).append(group_dn(group))
    parts = [
        _entry(BASE_DN, "objectClass: top", "objectClass: dcObject",
               "objectClass: organization", "o: Example Org", "dc: example"),
    ]
    for ou in ("people", "groups", "services"):
        parts.append(_entry(f"ou={ou},{BASE_DN}", "objectClass: organizationalUnit", f"ou: {ou}"))
    parts.append(_entry(
        SVC_DN, "objectClass: organizationalRole", "objectClass: simpleSecurityObject",
        "cn: svc", "description: service account for look-ups",
        f"userPassword: {ssha(SVC_PASSWORD)}",
    ))
    for name in USERS + SPECIAL_USERS:
        parts.append(_person(name, name, memberships.get(name, []), description=True))
    parts.append(_person(SASL_USER, SASL_USER, [], description=True, cleartext=True))
    for i in range(1, extra_users + 1):
        uid = f"user{i:05d}"
        parts.append(_person(uid, f"User {i:05d}", memberships.get(uid, []), description=False))
    for group, members in groups.items():
        parts.append(_entry(
            group_dn(group), "objectClass: groupOfNames", f"cn: {group}",
            *(_line("member", user_dn(m)) for m in members),
        ))
    return "".join(parts)


def build_conf(
    workdir: pathlib.Path, cert: pathlib.Path, key: pathlib.Path, ca: pathlib.Path
) -> str:
    settings = f"""\
loglevel        0
sizelimit       500
password-hash   {{SSHA}}
TLSCACertificateFile  {ca}
TLSCertificateFile    {cert}
TLSCertificateKeyFile {key}
# SASL PLAIN against userPassword, for the tests that prove the proxy refuses
# (or, when configured to, passes) SASL binds: authcid "NAME" is uid=NAME.
sasl-secprops   none
authz-regexp    "^uid=([^,]+)(,cn=[^,]+)*,cn=auth$" "uid=$1,ou=people,{BASE_DN}"
"""
    memberof = """\
overlay         memberof
memberof-group-oc   groupOfNames
memberof-member-ad  member
memberof-memberof-ad memberOf
memberof-refint     TRUE
"""
    acl = """\
access to attrs=userPassword
    by anonymous auth
    by self write
    by * none
access to attrs=description
    by users read
    by * none
access to *
    by * read
"""
    return (harness.global_section(workdir, modules=("back_mdb", "memberof"), lines=settings)
            + harness.mdb_section(workdir, suffix=BASE_DN, rootdn=ADMIN_DN,
                                  rootpw=ADMIN_PASSWORD, maxsize=268435456,
                                  indexes=("objectClass eq", "uid,cn,mail eq", "member eq"),
                                  lines=memberof, acl=acl))


# ---------------------------------------------------------------- process


@dataclass
class Slapd:
    url: str
    ldaps_url: str
    ca_file: str
    workdir: pathlib.Path
    base_dn: str = BASE_DN
    admin_dn: str = ADMIN_DN
    admin_password: str = ADMIN_PASSWORD
    svc_dn: str = SVC_DN
    svc_password: str = SVC_PASSWORD
    # slapd's -d level: "0" (nothing), or "stats" to log every operation in slapd.log
    # (a test that proves which searches or binds the proxy sends reads it:
    # searches(), binds()).
    debug: str = "0"
    _process: SlapdProcess | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def ldaps_port(self) -> int:
        return int(self.ldaps_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else 0

    def start(self) -> None:
        """(Re)start on the same ports and data; returns once slapd answers."""
        if self._process is None:
            self._process = SlapdProcess(self.workdir / "slapd.conf", [self.url, self.ldaps_url],
                                         self.svc_dn, self.svc_password, debug=self.debug)
        self._process.start(START_TIMEOUT)

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL if it does not go)."""
        if self._process is not None:
            self._process.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def searches(self, since: int = 0) -> list[str]:
        """The SRCH lines of slapd.log from byte ``since`` on (with ``debug="stats"``):
        ``base="..." scope=2 deref=0 filter="(...)"``, one per search received."""
        return [line.split(" SRCH ", 1)[1] for line in self._log_lines(since)
                if " SRCH base=" in line]

    def binds(self, since: int = 0) -> list[str]:
        """The DNs of the binds slapd received from byte ``since`` of slapd.log on
        (with ``debug="stats"``), one per BindRequest ("" for an anonymous one),
        whatever their result."""
        found = []
        for line in self._log_lines(since):
            if " BIND dn=\"" in line and " method=" in line:  # the request's line
                found.append(line.split(' BIND dn="', 1)[1].rsplit('" method=', 1)[0])
        return found

    def bind_connections(self, since: int = 0) -> list[tuple[str, str]]:
        """(connection, DN) of each bind of :meth:`binds`, e.g. ``("conn=1004", dn)``."""
        found = []
        for line in self._log_lines(since):
            if " BIND dn=\"" in line and " method=" in line:
                conn = next((w for w in line.split() if w.startswith("conn=")), "")
                found.append((conn, line.split(' BIND dn="', 1)[1].rsplit('" method=', 1)[0]))
        return found

    def connections_opened(self, since: int = 0) -> set[str]:
        """The connections slapd accepted from byte ``since`` of slapd.log on."""
        return {next(w for w in line.split() if w.startswith("conn="))
                for line in self._log_lines(since) if " ACCEPT from " in line}

    def _log_lines(self, since: int) -> list[str]:
        with open(self.workdir / "slapd.log", "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace").splitlines()

    def log_size(self) -> int:
        """Where slapd.log ends now (for :meth:`searches`)."""
        try:
            return (self.workdir / "slapd.log").stat().st_size
        except FileNotFoundError:
            return 0


def start_slapd(workdir: pathlib.Path, extra_users: int = 0,
                server_names: Sequence[str] = SERVER_NAMES, debug: str = "0") -> Slapd:
    """Create, load and start a slapd under ``workdir`` (which must be empty or new).

    ``server_names`` go into the server certificate (a test of hostname
    verification gives names that do not match 127.0.0.1); ``debug="stats"``
    logs every operation to ``slapd.log`` (:meth:`Slapd.searches`).
    """
    harness.check_installed()
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key, ca_cert = make_ca(workdir)
    cert, key = make_server_cert(workdir, ca_key, ca_cert, server_names)
    conf = workdir / "slapd.conf"
    conf.write_text(build_conf(workdir, cert, key, ca_path))
    ldif = workdir / "data.ldif"
    ldif.write_text(build_ldif(extra_users))
    harness.load(conf, ldif, timeout=120)
    for attempt in range(START_ATTEMPTS):
        server = Slapd(
            url=f"ldap://127.0.0.1:{free_port()}",
            ldaps_url=f"ldaps://127.0.0.1:{free_port()}",
            ca_file=str(ca_path),
            workdir=workdir,
            debug=debug,
        )
        try:
            server.start()
            return server
        except RuntimeError:
            # Another process may have taken a port between free_port() and slapd's bind.
            if attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")
