"""The real ``mfa-proxy serve`` as a subprocess, for end-to-end tests.

One :class:`ProxyProcess` is one config file in a work folder and (while
started) one ``mfa-proxy serve -c FILE`` process::

    proxy = ProxyProcess.configure(tmp_path, slapd, clients=[{"name": "vpn",
                                   "address": "127.0.0.1/32"}])
    proxy.cli("user", "enroll", "alice", "--secret", SECRET)   # same config
    proxy.start()                        # returns once /readyz answers 200
    ... proxy.radius_port, proxy.accounting_port, proxy.http_port, proxy.ldap_port
    ... proxy.client_secret("vpn"), proxy.state_url, proxy.key_file
    m = proxy.metrics()                  # /metrics, parsed
    m.value("mfa_proxy_requests_total", client="vpn", result="accept")
    proxy.stop()                         # SIGTERM; asserts a clean exit (status 0)

or, as a fixture body, ``with running_proxy(tmp_path, slapd, ...) as proxy:``
(or ``with proxy.running():`` for one configured and prepared first).

The config (a TOML file written from the parameters of :meth:`configure`):

- ``[directory]``: LDAP on ``slapd`` (its ``url``, the service account,
  ``ou=people`` / ``ou=groups``), short timeouts; ``directory={...}``
  overrides keys (``urls`` for failover, ``connect_timeout``...).
- ``[state]``: SQLite ``state.db`` and ``secret.key`` in the work folder, or
  ``state_url`` / ``key_file`` given (two instances sharing one state pass
  the first one's).
- ``[radius]`` (unless ``radius=None``): auth and accounting on free
  loopback UDP ports; ``radius={...}`` adds keys; ``clients`` is the list of
  ``[[radius.clients]]`` tables (default: one client "local" for
  127.0.0.1/32), each gets a secret unless it has one; ``reply`` the list of
  ``[[radius.reply]]`` tables.
- ``[ldap]`` only when ``ldap={...}`` is given: ``listen`` on a free TCP
  port unless set.
- ``[portal]`` only when ``portal={...}`` is given: ``listen`` on a free TCP
  port unless set (``proxy.portal_port``).
- ``[http]`` on a free TCP port, always (readiness and metrics need it).
- ``overrides={"policy": {"max_failures": 3}, ...}``: any other section,
  merged key by key last.

Free ports are picked (by the OS) when the config is written; if another
process takes one before the start, the start is retried on fresh ports
(bounded).  ``proxy.user(NAME)`` is ``user show NAME --json`` as a dict;
``proxy.get(PATH)`` is (status, body) of any HTTP path; ``proxy.log_tail()``
the end of the process's output.  Every wait here is bounded; the process is
only ever stopped by its own PID.

At the end, the NAS side for RADIUS tests: :func:`pyrad_client` and
:func:`pyrad_auth` (pyrad, from a chosen loopback source address, replies
verified by pyrad) and :class:`Datagrams` (raw bytes in and out).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.radius.packet import SHIPPED_DICTIONARY
from tests.integration.slapd import Slapd

START_TIMEOUT = 30.0  # seconds for `serve` to answer /readyz 200
STOP_TIMEOUT = 15.0  # seconds for a clean exit after SIGTERM
CLI_TIMEOUT = 60.0
START_ATTEMPTS = 3  # fresh ports each time a port was taken meanwhile
HTTP_TIMEOUT = 10.0

MFA_PROXY = str(pathlib.Path(sys.executable).with_name("mfa-proxy"))
if not os.access(MFA_PROXY, os.X_OK):  # not run from the project's virtualenv
    MFA_PROXY = shutil.which("mfa-proxy") or MFA_PROXY


def free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- metrics


class Metrics(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """``/metrics`` as {(sample name, frozenset of (label, value)): value}.

    Sample names are as exposed: ``mfa_proxy_requests_total``,
    ``mfa_proxy_decision_seconds_count``, ``..._bucket`` ...
    """

    types: dict[str, str]  # family name (without _total) -> counter, gauge, histogram ...

    @classmethod
    def parse(cls, text: str) -> Metrics:
        m = cls()
        m.types = {}
        for family in text_string_to_metric_families(text):
            m.types[family.name] = family.type
            for sample in family.samples:
                m[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return m

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples called ``name`` that have these labels (0 when none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.items() if n == name and want <= ls)

    def label_sets(self, name: str) -> list[dict[str, str]]:
        """The label sets of every sample called ``name``."""
        return [dict(ls) for (n, ls) in self if n == name]


# ---------------------------------------------------------------- TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | pathlib.Path):
        return json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml_key(key: str) -> str:
    bare = key.replace("-", "").replace("_", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def to_toml(doc: Mapping[str, Any]) -> str:
    """A TOML document of tables (dicts) and arrays of tables (lists of dicts)."""
    out: list[str] = []

    def table(name: str, body: Mapping[str, Any], array: bool = False) -> None:
        out.append(f"[[{name}]]" if array else f"[{name}]")
        nested = []
        for k, v in body.items():
            if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
                nested.append((k, v))
            else:
                out.append(f"{_toml_key(k)} = {_toml_value(v)}")
        out.append("")
        for k, items in nested:
            for item in items:
                table(f"{name}.{k}", item, array=True)

    for name, body in doc.items():
        table(name, body)
    text = "\n".join(out)
    if tomllib.loads(text) != json.loads(json.dumps(doc, default=str)):
        raise AssertionError(f"TOML writer lost something:\n{text}")
    return text


# ---------------------------------------------------------------- the process


class ProxyProcess:
    """A config in ``workdir`` and the ``mfa-proxy serve`` process running it."""

    def __init__(self, workdir: pathlib.Path, doc: dict[str, Any],
                 ports: dict[str, bool]) -> None:
        self.workdir = workdir
        self.config_path = workdir / "mfa-proxy.toml"
        self.doc = doc  # the config as written; rewrite with write_config() after changes
        self._auto_ports = ports  # which listeners got a free port from us
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "serve.log"  # every start appends to it
        self._log_start = 0

    # -- building the config

    @classmethod
    def configure(
        cls, workdir: pathlib.Path, slapd: Slapd | None = None, *,
        clients: Sequence[Mapping[str, Any]] | None = None,
        radius: Mapping[str, Any] | None = {},  # noqa: B006 - read only
        reply: Sequence[Mapping[str, Any]] = (),
        ldap: Mapping[str, Any] | None = None,
        portal: Mapping[str, Any] | None = None,
        directory: Mapping[str, Any] | None = None,
        state_url: str | None = None, key_file: pathlib.Path | str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> ProxyProcess:
        """Write ``workdir/mfa-proxy.toml`` (see the module docstring); start nothing."""
        workdir = pathlib.Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "state": {"url": state_url or f"sqlite:///{workdir / 'state.db'}",
                      "key_file": str(key_file or workdir / "secret.key")},
            "logging": {"level": "info"},
        }
        d: dict[str, Any] = {}
        if slapd is not None:
            d = {"type": "ldap", "urls": [slapd.url], "bind_dn": slapd.svc_dn,
                 "bind_password": slapd.svc_password,
                 "user_base": f"ou=people,{slapd.base_dn}",
                 "group_base": f"ou=groups,{slapd.base_dn}",
                 "connect_timeout": 2.0, "timeout": 5.0}
        d.update(directory or {})
        if not d:
            raise ValueError("give a slapd or a directory={...} section")
        doc["directory"] = d
        if radius is not None:
            r = dict(radius)
            given = clients if clients is not None else [{"name": "local",
                                                          "address": "127.0.0.1/32"}]
            r["clients"] = [{"secret": f"{c['name']}-shared-secret-0123456789", **c}
                            for c in given]
            if reply:
                r["reply"] = [dict(x) for x in reply]
            doc["radius"] = r
        if ldap is not None:
            doc["ldap"] = dict(ldap)
        if portal is not None:
            doc["portal"] = dict(portal)
        doc["http"] = {}
        for name, section in (overrides or {}).items():
            doc.setdefault(name, {}).update(section)
        # listeners without an address get a free port (now, and again if taken)
        auto = {"radius": "radius" in doc and "listen" not in doc["radius"],
                "accounting": "radius" in doc and "accounting_listen" not in doc["radius"],
                "ldap": "ldap" in doc and "listen" not in doc["ldap"],
                "portal": "portal" in doc and "listen" not in doc["portal"],
                "http": "listen" not in doc["http"]}
        proxy = cls(workdir, doc, auto)
        proxy._pick_ports()
        proxy.write_config()
        return proxy

    def _pick_ports(self) -> None:
        if self._auto_ports.get("radius"):
            self.doc["radius"]["listen"] = [f"127.0.0.1:{free_udp_port()}"]
        if self._auto_ports.get("accounting"):
            self.doc["radius"]["accounting_listen"] = [f"127.0.0.1:{free_udp_port()}"]
        if self._auto_ports.get("ldap"):
            self.doc["ldap"]["listen"] = [f"127.0.0.1:{free_tcp_port()}"]
        if self._auto_ports.get("portal"):
            self.doc["portal"]["listen"] = f"127.0.0.1:{free_tcp_port()}"
        if self._auto_ports.get("http"):
            self.doc["http"]["listen"] = f"127.0.0.1:{free_tcp_port()}"

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.doc), encoding="utf-8")

    # -- what tests talk to

    @staticmethod
    def _port(address: str) -> int:
        return int(address.rsplit(":", 1)[1])

    @property
    def radius_port(self) -> int:
        return self._port(self.doc["radius"]["listen"][0])

    @property
    def accounting_port(self) -> int:
        return self._port(self.doc["radius"]["accounting_listen"][0])

    @property
    def http_port(self) -> int:
        return self._port(self.doc["http"]["listen"])

    @property
    def portal_port(self) -> int:
        return self._port(self.doc["portal"]["listen"])

    @property
    def ldap_port(self) -> int:
        return self._port(self.doc["ldap"]["listen"][0])

    def client_secret(self, name: str | None = None) -> bytes:
        """The shared secret of the RADIUS client ``name`` (default: the first)."""
        clients = self.doc["radius"]["clients"]
        client = clients[0] if name is None else next(c for c in clients if c["name"] == name)
        return str(client["secret"]).encode()

    @property
    def secret(self) -> bytes:
        return self.client_secret()

    @property
    def state_url(self) -> str:
        return str(self.doc["state"]["url"])

    @property
    def state_path(self) -> pathlib.Path:
        """The SQLite file (for tests that edit a row the CLI cannot)."""
        assert self.state_url.startswith("sqlite:///"), self.state_url
        return pathlib.Path(self.state_url.removeprefix("sqlite:///"))

    @property
    def key_file(self) -> pathlib.Path:
        return pathlib.Path(self.doc["state"]["key_file"])

    # -- running

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready: bool = True) -> None:
        """Start ``serve``; return once /readyz (or /healthz when ``ready`` is
        False, for a start with the directory down) answers 200."""
        if self.alive:
            return
        for attempt in range(START_ATTEMPTS):
            self._spawn()
            try:
                self._wait_until("/readyz" if ready else "/healthz")
                return
            except RuntimeError:
                self._terminate()
                raise
            except _PortTaken:
                self._terminate()
                if attempt == START_ATTEMPTS - 1:
                    raise RuntimeError(
                        f"mfa-proxy could not listen:\n{self.log_tail()}") from None
                self._pick_ports()
                self.write_config()

    def _spawn(self) -> None:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [MFA_PROXY, "serve", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir)
        finally:
            log.close()

    def _wait_until(self, path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                text = self.log_path.read_bytes()[self._log_start:].decode(errors="replace")
                if "Address already in use" in text or "CannotListenError" in text:
                    raise _PortTaken()
                raise RuntimeError(f"mfa-proxy exited with {self.proc.returncode}:\n{text}")
            status, _ = self.get(path, timeout=2.0)
            if status == 200:
                return
            time.sleep(0.05)
        self._terminate()
        raise RuntimeError(f"mfa-proxy did not answer {path} within {START_TIMEOUT}s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM by PID and assert a clean exit (status 0), with the log if not."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is not None:
            raise AssertionError(f"mfa-proxy had already exited with {proc.returncode}:\n"
                                 f"{self.log_tail()}")
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(f"mfa-proxy ignored SIGTERM for {STOP_TIMEOUT}s:\n"
                                 f"{self.log_tail()}") from None
        assert status == 0, f"mfa-proxy exited with {status} on SIGTERM:\n{self.log_tail()}"

    @contextmanager
    def running(self) -> Iterator[ProxyProcess]:
        """Start; yield; stop, which also fails when the process died on its own."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _terminate(self) -> None:
        """Stop without judging the exit (a failed start)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP and CLI

    def get(self, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int | None, str]:
        """(status, body) of GET ``path`` on the HTTP listener; (None, why) if unreachable."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return None, str(e)

    def metrics(self) -> Metrics:
        status, body = self.get("/metrics")
        assert status == 200, f"/metrics: {status} {body}"
        return Metrics.parse(body)

    def cli(self, *args: str, input: str | None = None,  # noqa: A002 - as subprocess.run
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``mfa-proxy ARGS -c CONFIG``; with ``check`` a non-zero exit fails the test."""
        done = subprocess.run([MFA_PROXY, *args, "-c", str(self.config_path)],
                              input=input, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT, cwd=self.workdir, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"mfa-proxy {' '.join(args)} exited with {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def user(self, name: str) -> dict[str, Any]:
        """``user show NAME --json``."""
        return dict(json.loads(self.cli("user", "show", name, "--json").stdout))


class _PortTaken(Exception):
    pass


@contextmanager
def running_proxy(workdir: pathlib.Path, slapd: Slapd | None = None,
                  **options: Any) -> Iterator[ProxyProcess]:
    """Configure, start, yield, stop (asserting a clean exit) — for fixtures."""
    with ProxyProcess.configure(workdir, slapd, **options).running() as proxy:
        yield proxy


# ---------------------------------------------------------------- the NAS side (RADIUS)

RADIUS_DICTIONARY = SHIPPED_DICTIONARY
RADIUS_TIMEOUT = 15.0  # generous: a reply that should come


def pyrad_client(proxy: ProxyProcess, client: str | None = None, source: str = "127.0.0.1",
                 timeout: float = RADIUS_TIMEOUT) -> Any:
    """A ``pyrad.client.Client`` for the proxy's auth and accounting ports, sending
    from ``source`` (a loopback address picks the RADIUS client) with that
    client's secret; it sends once and insists on a Message-Authenticator in
    replies (``enforce_ma``)."""
    from pyrad.client import Client
    from pyrad.dictionary import Dictionary

    nas = Client(server="127.0.0.1", authport=proxy.radius_port,
                 acctport=proxy.accounting_port, secret=proxy.client_secret(client),
                 dict=Dictionary(str(RADIUS_DICTIONARY)), retries=1, timeout=timeout,
                 enforce_ma=True)
    nas.bind((source, 0))
    return nas


def pyrad_auth(nas: Any, username: str, password: str, state: bytes | None = None) -> Any:
    """One PAP Access-Request through ``nas`` (see :func:`pyrad_client`); the reply
    packet (``.code``, ``["Reply-Message"]``...); pyrad's Timeout when none came."""
    request = nas.CreateAuthPacket(User_Name=username)
    request["User-Password"] = request.PwCrypt(password)
    if state is not None:
        request["State"] = state
    return nas.SendPacket(request)


class Datagrams:
    """A UDP socket on a loopback ``source`` address, for byte-exact exchanges."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.target = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.target)

    def receive(self, timeout: float = RADIUS_TIMEOUT) -> bytes | None:
        """The next datagram, or None after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65535)
        except TimeoutError:
            return None

    def exchange(self, datagram: bytes, timeout: float = RADIUS_TIMEOUT) -> bytes | None:
        """Send, then the first datagram answering its Identifier (others are skipped)."""
        self.send(datagram)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            reply = self.receive(left)
            if reply is None:
                return None
            if len(reply) >= 2 and reply[1] == datagram[1]:
                return reply
        return None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Datagrams:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
