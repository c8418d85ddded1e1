"""A throwaway PostgreSQL server for the tests.

``start_postgres()`` runs ``initdb`` into a private temporary folder, starts
``postgres`` in the foreground (so we own its PID) on a free loopback port
with its unix socket inside that folder, and returns a :class:`Postgres`
whose ``new_database()`` gives SQLAlchemy URLs
(``postgresql+psycopg://postgres@127.0.0.1:PORT/NAME``). ``stop()`` ends the
server by its PID and removes the folder.

As root, every PostgreSQL program runs as the ``postgres`` user (the server
refuses to run as root); otherwise as the current user. Authentication is
``trust`` on loopback only: the server lives for one test session.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def find_bindir() -> Path:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, postgres) not found; "
                       "scripts/test installs the Debian package `postgresql`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user() -> dict[str, Any]:
    """Popen arguments that run a program as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@dataclass
class Postgres:
    bindir: Path
    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    _counter: int = field(default=0)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        import psycopg

        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres() -> Postgres:
    bindir = find_bindir()
    # Not under pytest's tmp_path: that is private to root (0700) and the
    # server runs as `postgres`.
    workdir = Path(tempfile.mkdtemp(prefix="mfa-proxy-pg-"))
    user = _as_user()
    if user:
        os.chown(workdir, user["user"], user["group"])
    os.chmod(workdir, 0o700)
    data, sockets, log = workdir / "data", workdir / "sock", workdir / "postgres.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
           "HOME": str(workdir)}
    try:
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, cwd=workdir, env=env, timeout=120, **user)
        sockets.mkdir()
        if user:
            os.chown(sockets, user["user"], user["group"])
        port = free_port()
        logf = open(log, "wb")  # noqa: SIM115 (kept open for the server's lifetime)
        process = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
             "-k", str(sockets), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, env=env, **user)
        logf.close()
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = Postgres(bindir, workdir, port, process, log)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Postgres) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited ({server.process.returncode}):\n"
                               + server.log.read_text(errors="replace")[-2000:])
        try:
            with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres",
                                 dbname="postgres", connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not accept connections within "
                                   f"{START_TIMEOUT:g} s:\n"
                                   + server.log.read_text(errors="replace")[-2000:]) from None
            time.sleep(0.05)
