"""The bench directory: an OpenLDAP slapd (mdb) with N users, loaded with slapadd.

Data (the load generators rely on it, see :mod:`bench.common`)::

    uid=userNNNNN,ou=people,dc=example,dc=org   password passNNNNN ({SSHA}),
        inetOrgPerson + totpUser: totpSecret = base32(sha1("totp:" + uid))
    cn=svc,ou=services,dc=example,dc=org        service account, "svc-secret"
    cn=benchNN,ou=groups,dc=example,dc=org      GROUPS groupOfNames; user i is a
        ``member`` of group i % GROUPS (indexed eq; no memberOf on the users, as
        in a directory without the overlay: only a group search tells)

``totpSecret`` (a bench-only schema in OpenLDAP's experimental OID arc) is
what FreeRADIUS's rlm_totp reads; only the service account may read it.
The test suite's slapd (tests/integration/slapd.py) has no such attribute and
a 100,000-member group, so the benchmark loads its own data; the config
skeleton, slapadd and the process are the same harness
(:mod:`bench.slapd_harness`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench import slapd_harness as harness
from bench.common import (
    BASE_DN,
    SVC_DN,
    SVC_PASSWORD,
    Managed,
    free_port,
    password,
    say,
    totp_secret,
    uid,
    user_dn,
)
from bench.ldapload import try_simple_bind
from bench.slapd_harness import SlapdProcess, ssha

ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-secret"  # noqa: S105 - a throwaway slapd's
TOTP_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.4203.666.11.99.1 NAME 'totpSecret'
    DESC 'Base32 TOTP shared secret (bench only)' EQUALITY caseExactMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.4203.666.11.99.2 NAME 'totpUser' SUP top AUXILIARY
    MAY totpSecret )
"""
GROUPS = 10
GROUP_BASE = f"ou=groups,{BASE_DN}"


def group_name(i: int) -> str:
    return f"bench{i % GROUPS:02d}"


def write_ldif(path: Path, users: int) -> None:
    with open(path, "w", encoding="ascii") as f:
        w = f.write
        w(f"dn: {BASE_DN}\nobjectClass: top\nobjectClass: dcObject\n"
          f"objectClass: organization\no: Example Org\ndc: example\n\n")
        for ou in ("people", "groups", "services"):
            w(f"dn: ou={ou},{BASE_DN}\nobjectClass: organizationalUnit\nou: {ou}\n\n")
        w(f"dn: {SVC_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
          f"cn: svc\ndescription: service account for look-ups\n"
          f"userPassword: {ssha(SVC_PASSWORD)}\n\n")
        for i in range(1, users + 1):
            u = uid(i)
            w(f"dn: {user_dn(i)}\nobjectClass: inetOrgPerson\nobjectClass: totpUser\n"
              f"uid: {u}\ncn: User {i:05d}\nsn: {i:05d}\nmail: {u}@example.org\n"
              f"userPassword: {ssha(password(i))}\ntotpSecret: {totp_secret(u)}\n\n")
        for g in range(GROUPS):
            w(f"dn: cn={group_name(g)},{GROUP_BASE}\nobjectClass: groupOfNames\n"
              f"cn: {group_name(g)}\n")
            w("".join(f"member: {user_dn(i)}\n" for i in range(1, users + 1)
                      if i % GROUPS == g) or f"member: {SVC_DN}\n")
            w("\n")


def slapd_conf(workdir: Path, threads: int) -> str:
    settings = (f"loglevel        0\nthreads         {threads}\ntool-threads    2\n"
                "sizelimit       unlimited\npassword-hash   {SSHA}\n")
    acl = f"""\
access to attrs=userPassword
    by anonymous auth
    by self write
    by * none
access to attrs=totpSecret
    by dn.exact="{SVC_DN}" read
    by * none
access to *
    by dn.exact="{SVC_DN}" read
    by self read
    by * none
"""
    return (harness.global_section(workdir, schema=TOTP_SCHEMA, lines=settings)
            + harness.mdb_section(workdir, suffix=BASE_DN, rootdn=ADMIN_DN,
                                  rootpw=ADMIN_PASSWORD, maxsize=2147483648,
                                  indexes=("objectClass eq", "uid,cn,mail eq", "member eq"),
                                  acl=acl))


@dataclass
class Directory:
    proc: Managed
    host: str
    port: int
    users: int

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


def load(workdir: Path, users: int, threads: int = 16) -> Path:
    """Write slapd.conf and load the data with slapadd; returns the config path."""
    harness.check_installed()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "slapd.conf"
    conf.write_text(slapd_conf(workdir, threads))
    t0 = time.monotonic()
    ldif = workdir / "data.ldif"
    write_ldif(ldif, users)
    t1 = time.monotonic()
    harness.load(conf, ldif, timeout=1800)
    ldif.unlink()
    say(f"slapd: {users:,} users: LDIF {t1 - t0:.1f} s, slapadd {time.monotonic() - t1:.1f} s")
    return conf


def start(workdir: Path, users: int, threads: int = 16) -> Directory:
    """Load and start slapd in the foreground (we own its PID) on a free loopback port.
    The caller stops it: ``directory.proc.stop()`` (or use it as a context manager)."""
    workdir = workdir.resolve()
    conf = load(workdir, users, threads)
    port = free_port()
    proc = SlapdProcess(conf, [f"ldap://127.0.0.1:{port}"], SVC_DN, SVC_PASSWORD)
    proc.start(timeout=30)
    try:
        if try_simple_bind("127.0.0.1", port, user_dn(users), password(users)) != 0:
            raise RuntimeError(f"slapd: {uid(users)} cannot bind: data not loaded?")
    except BaseException:
        proc.stop()
        raise
    assert proc.proc is not None
    return Directory(proc.proc, "127.0.0.1", port, users)
