"""`scripts/serve` on a copy of the embedded default config (conf/mfa-proxy.toml,
its ports moved to free ones, its var/ in a temporary folder): it starts, answers
/healthz, /readyz and /metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "scripts" / "serve"
START_WAIT = 90.0  # bounds, never expectations: machines are noisy
STOP_WAIT = 30.0

FAMILIES = [
    ("mfa_proxy_requests_total", "counter"),
    ("mfa_proxy_decision_seconds", "histogram"),
    ("mfa_proxy_radius_dropped_total", "counter"),
    ("mfa_proxy_directory_seconds", "histogram"),
    ("mfa_proxy_directory_errors_total", "counter"),
    ("mfa_proxy_lockouts_total", "counter"),
    ("mfa_proxy_ldap_connections", "gauge"),
    ("mfa_proxy_users", "gauge"),
]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_pair() -> int:
    """A UDP port p with p + 1 free too (RADIUS accounting defaults to auth + 1)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP port pair")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback)
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    root: Path
    http: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_WAIT)
            raise


def default_config_copy(root: Path, http: int, radius: int) -> Path:
    conf = root / "conf"
    conf.mkdir()
    text = (REPO / "conf" / "mfa-proxy.toml").read_text()
    assert '"127.0.0.1:9812"' in text and '"127.0.0.1:1812"' in text
    text = text.replace('"127.0.0.1:9812"', f'"127.0.0.1:{http}"')
    text = text.replace('"127.0.0.1:1812"', f'"127.0.0.1:{radius}"')
    from tests.integration.proxyproc import free_tcp_port

    assert '"127.0.0.1:8443"' in text
    text = text.replace('"127.0.0.1:8443"', f'"127.0.0.1:{free_tcp_port()}"')
    (conf / "mfa-proxy.toml").write_text(text)
    return conf / "mfa-proxy.toml"


def start(config: Path, root: Path, http: int) -> Server:
    log = root / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(SERVE), "-c", str(config)], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    return Server(process, root, http, log)


def wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + START_WAIT
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"serve exited {server.process.returncode}:\n{server.output()}")
        try:
            if get(server.url("/healthz"))[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"/healthz did not answer within {START_WAIT:g} s:\n{server.output()}")
        time.sleep(0.1)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    http = free_tcp_port()
    config = default_config_copy(tmp_path, http, free_udp_pair())
    s = start(config, tmp_path, http)
    try:
        wait_healthy(s)
        yield s
    finally:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait(STOP_WAIT)


def test_serve_answers_health_ready_metrics_and_stops_on_sigterm(server: Server) -> None:
    assert get(server.url("/healthz")) == (200, "ok\n")
    assert get(server.url("/readyz")) == (200, "ready\n")

    status, metrics = get(server.url("/metrics"))
    assert status == 200
    for family, kind in FAMILIES:
        assert f"# TYPE {family} {kind}\n" in metrics, family
    assert "mfa_proxy_ready 1.0" in metrics  # set by the /readyz just answered

    # the embedded default made its own state under the copy's var/
    var = server.root / "var"
    for name in ("mfa-proxy.db", "secret.key", "radius-localhost.secret"):
        assert (var / name).is_file(), name
        assert (var / name).stat().st_mode & 0o077 == 0, name

    assert server.stop() == 0
    assert "stopped" in server.output()
    with pytest.raises(OSError):
        get(server.url("/healthz"))
    # serve says what it listens on itself; Twisted's port chatter is debug
    for chatter in ("Starting protocol", "Stopping protocol", " starting on ", "Port Closed",
                    "Traceback"):
        assert chatter not in server.output(), chatter


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_every_secret_file_is_private_even_under_umask_000(tmp_path: Path) -> None:
    """What the product writes under var/ holds secrets: the state database (and
    its SQLite -wal and -shm files, which hold recent rows), the key file, the
    generated RADIUS client secret and the local users file (argon2id hashes).
    Each is 0600 because it was created so, not thanks to the umask."""
    http = free_tcp_port()
    config = default_config_copy(tmp_path, http, free_udp_pair())
    var = tmp_path / "var"
    var.mkdir()
    users = var / "users.toml"
    users.write_text("")
    users.chmod(0o644)  # made by hand, world-readable: `local-user set` replaces it
    with umask(0):  # a child keeps the umask it was started with
        s = start(config, tmp_path, http)
    try:
        wait_healthy(s)  # first: serve creates the state and the RADIUS secret
        with umask(0):
            cli = subprocess.run(
                [str(Path(sys.executable).with_name("mfa-proxy")), "local-user", "set",
                 "alice", "-c", str(config)], input="alice-pw\n", capture_output=True,
                text=True, timeout=120, check=False)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert get(s.url("/readyz")) == (200, "ready\n")
        names = ["mfa-proxy.db", "mfa-proxy.db-wal", "mfa-proxy.db-shm", "secret.key",
                 "radius-localhost.secret", "users.toml"]
        modes = {n: oct(stat.S_IMODE((var / n).stat().st_mode)) for n in names}
        assert modes == dict.fromkeys(names, "0o600"), modes
        assert s.stop() == 0
    finally:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait(STOP_WAIT)


def test_readyz_follows_the_directory(server: Server) -> None:
    users = server.root / "var" / "users.toml"
    users.write_text("[users.alice\n")  # a broken users file: the directory cannot answer
    status, body = get(server.url("/readyz"))
    assert status == 503
    assert body.startswith("not ready\n")
    assert "directory:" in body
    assert "mfa_proxy_ready 0.0" in get(server.url("/metrics"))[1]
    users.write_text("")
    assert get(server.url("/readyz")) == (200, "ready\n")
    assert get(server.url("/healthz"))[0] == 200  # alive all along
    assert server.stop() == 0


def get_from(source: str, port: int, path: str) -> tuple[int, str]:
    """GET from a chosen loopback source address (127.0.0.0/8 is all loopback)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def test_readyz_reasons_with_admin_networks_set(tmp_path: Path) -> None:
    """With `[http] admin_networks` naming other networks, serve starts and
    loopback sources (127.0.0.2 here) still see the reasons: loopback is always
    an admin source. A stranger's view ("not ready" alone) is in
    tests/unit/test_http_ready.py: only loopback addresses exist here."""
    http = free_tcp_port()
    config = default_config_copy(tmp_path, http, free_udp_pair())
    text = config.read_text()
    assert "admin_networks = []" in text
    config.write_text(text.replace("admin_networks = []",
                                   'admin_networks = ["192.0.2.0/24", "2001:db8::/32"]'))
    s = start(config, tmp_path, http)
    try:
        wait_healthy(s)
        (tmp_path / "var" / "users.toml").write_text("[users.alice\n")
        status, body = get_from("127.0.0.2", http, "/readyz")
        assert status == 503 and body.startswith("not ready\ndirectory:"), body
        (tmp_path / "var" / "users.toml").write_text("")
        assert get_from("127.0.0.2", http, "/readyz") == (200, "ready\n")
        assert s.stop() == 0
    finally:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait(STOP_WAIT)


def test_a_directory_down_at_start_is_a_warning_and_readable_in_readyz(tmp_path: Path) -> None:
    """An LDAP directory that refuses connections: serve starts all the same, says
    so in one warning, and /readyz names each URL once, in plain words."""
    from tests.integration.proxyproc import free_tcp_port as free

    http, dead = free_tcp_port(), free()
    config = tmp_path / "mfa-proxy.toml"
    config.write_text(f"""\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:{dead}"]
user_base = "ou=people,dc=example,dc=org"

[http]
listen = "127.0.0.1:{http}"
""")
    s = start(config, tmp_path, http)
    try:
        wait_healthy(s)
        status, body = get(s.url("/readyz"))
        assert (status, body) == (
            503, f"not ready\ndirectory: ldap://127.0.0.1:{dead} connection refused\n")
        assert s.stop() == 0
        out = s.output()
        warnings = [line for line in out.splitlines() if "start-up" in line]
        assert len(warnings) == 1 and " WARNING " in warnings[0], out
        assert f"ldap://127.0.0.1:{dead} connection refused" in warnings[0]
        assert " ERROR " not in out and "Traceback" not in out, out
    finally:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait(STOP_WAIT)


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = default_config_copy(tmp_path, free_tcp_port(), free_udp_pair())
    text = config.read_text()
    config.write_text(text.replace("enrollment_days = 7", "enrollment_days = 400")
                      .replace('"127.0.0.1/32"', '"127.0.0.1/99"'))
    p = subprocess.run([str(SERVE), "-c", str(config)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=START_WAIT)
    assert p.returncode == 2
    assert sorted(p.stderr.splitlines()) == [
        "config error: policy.enrollment_days: must be between 1 and 365, got 400",
        "config error: radius.clients[0].address: not an address or CIDR: '127.0.0.1/99'",
    ]
    assert not (tmp_path / "var" / "mfa-proxy.db").exists()


def test_serve_exits_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http = int(taken.getsockname()[1])
        config = default_config_copy(tmp_path, http, free_udp_pair())
        p = subprocess.run([str(SERVE), "-c", str(config)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=START_WAIT)
    assert p.returncode == 1, p.stderr
    assert "cannot start" in p.stderr
