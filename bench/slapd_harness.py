"""The one slapd harness, for the benchmarks and the integration tests alike.

What every throwaway OpenLDAP ``slapd`` here has in common: a ``slapd.conf``
built from the same two sections (global, one mdb database), data loaded
with ``slapadd`` before the start, and a slapd in the foreground (``-d 0``)
whose PID we own (``-d`` keeps it there), started on loopback URLs and ready once a simple bind
answers. What differs — the data, the ACLs, TLS, overlays, the bench's
``totpSecret`` schema — is each caller's: :mod:`bench.slapd` (the bench
directory, 100,000 users) and ``tests/integration/slapd.py`` (the test
entries, TLS, SASL, memberOf).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import Managed, tail
from bench.ldapload import try_simple_bind

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")


def ssha(password: str) -> str:
    """{SSHA} hash, as slappasswd makes it (slapadd stores values verbatim)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 - {SSHA} is SHA-1
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def check_installed() -> None:
    if not os.access(SLAPD, os.X_OK) or not os.access(SLAPADD, os.X_OK):
        raise RuntimeError(f"{SLAPD} not found (scripts/test and scripts/bench install it; "
                           "or apt-get install slapd ldap-utils)")


def global_section(workdir: Path, *, modules: Sequence[str] = ("back_mdb",),
                   schema: str = "", lines: str = "") -> str:
    """The part of ``slapd.conf`` before the database: schemas, pid files,
    modules, then the caller's ``lines`` (log level, limits, TLS, SASL)."""
    includes = "".join(f"include         {SCHEMA_DIR}/{name}.schema\n" for name in SCHEMAS)
    loads = "".join(f"moduleload      {m}\n" for m in modules)
    return (f"{includes}{schema}"
            f"pidfile         {workdir}/slapd.pid\n"
            f"argsfile        {workdir}/slapd.args\n"
            f"modulepath      {MODULE_DIR}\n{loads}{lines}")


def mdb_section(workdir: Path, *, suffix: str, rootdn: str, rootpw: str, maxsize: int,
                indexes: Sequence[str], lines: str = "", acl: str = "") -> str:
    """One mdb database under ``workdir/db``: the caller's overlays in ``lines``
    (after the indexes), then its ACL."""
    index = "".join(f"index           {i}\n" for i in indexes)
    return (f"\ndatabase        mdb\nmaxsize         {maxsize}\n"
            f'suffix          "{suffix}"\nrootdn          "{rootdn}"\n'
            f"rootpw          {ssha(rootpw)}\ndirectory       {workdir}/db\n"
            f"{index}{lines}{acl}")


def load(conf: Path, ldif: Path, timeout: float) -> None:
    """``slapadd`` the LDIF into the (empty) database of ``conf``."""
    (conf.parent / "db").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([SLAPADD, "-q", "-f", str(conf), "-l", str(ldif)],
                          capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"slapadd exited with {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")


class SlapdProcess:
    """slapd in the foreground on ``urls``, stopped by PID; restartable on the
    same URLs and data (the tests take the directory down and bring it back)."""

    def __init__(self, conf: Path, urls: Sequence[str], ready_dn: str, ready_password: str,
                 log: Path | None = None, debug: str = "0") -> None:
        self.conf, self.urls = conf, tuple(urls)
        # slapd's -d level: "0" logs nothing; "stats" logs every operation to ``log``.
        self.debug = debug
        self.ready_dn, self.ready_password = ready_dn, ready_password
        self.log = log or conf.parent / "slapd.log"
        self.proc: Managed | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float) -> None:
        """Start (unless running) and return once a simple bind on the first URL
        answers; a slapd that exits or stays silent is stopped and reported."""
        if self.running:
            return
        listen = " ".join(f"{url}/" for url in self.urls)
        argv = [SLAPD, "-d", self.debug, "-f", str(self.conf), "-h", listen]
        self.proc = Managed.start("slapd", argv, self.log)
        host, port = self.urls[0].split("://", 1)[1].rsplit(":", 1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.proc.check()
                if self._bind(host, int(port)) == 0:
                    return
                time.sleep(0.05)
            raise RuntimeError(f"slapd did not answer within {timeout:g} s:\n{tail(self.log)}")
        except BaseException:
            self.stop()
            raise

    def _bind(self, host: str, port: int) -> int | None:
        try:
            return try_simple_bind(host, port, self.ready_dn, self.ready_password, timeout=1.0)
        except OSError:  # not listening yet
            return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> SlapdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
