"""`mfa-proxy check-config --connect [--user NAME]` against a real slapd and a dead port:
each URL's reachability, TLS and latency, the service bind, the user filter and
the group search; exit 0 when every URL answers and binds, 1 when one does not,
2 for a bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slapd import Slapd, free_port

pytestmark = pytest.mark.timeout(180)

MFA_PROXY = str(Path(sys.executable).with_name("mfa-proxy"))


def config(root: Path, slapd: Slapd, urls: list[str], *, password: str | None = None,
           extra: str = "") -> Path:
    (root / "svc.secret").write_text((password or slapd.svc_password) + "\n")
    (root / "svc.secret").chmod(0o600)
    path = root / "mfa-proxy.toml"
    path.write_text(f"""\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[directory]
type = "ldap"
urls = [{", ".join(f'"{u}"' for u in urls)}]
bind_dn = "{slapd.svc_dn}"
bind_password_file = "svc.secret"
user_base = "ou=people,{slapd.base_dn}"
group_base = "ou=groups,{slapd.base_dn}"
ca_file = "{slapd.ca_file}"
connect_timeout = 2.0
{extra}
""")
    return path


def check(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MFA_PROXY, "check-config", "-c", str(path), "--connect", *args],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=path.parent)


def test_a_live_directory_with_starttls_and_a_probe_user(tmp_path: Path, slapd: Slapd) -> None:
    path = config(tmp_path, slapd, [slapd.url], extra="start_tls = true")
    r = check(path, "--user", "Alice")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == f"{path}: OK"
    url = slapd.url
    said = {line.split(": ", 1)[1].split(" in ")[0].split(" (")[0] for line in lines[1:-1]}
    assert said >= {
        f"the service account {slapd.svc_dn} binds",
        f"user 'Alice': found uid=alice,ou=people,{slapd.base_dn}",
        f"groups of 'Alice': 3 under ou=groups,{slapd.base_dn}",
    }, lines
    [reach] = [line for line in lines if "reachable" in line]
    assert reach.startswith(f"{url}: reachable in ") and reach.endswith(
        f"ms; TLS: StartTLS, certificate and name verified against CA file {slapd.ca_file}")
    assert lines[-1] == "directory: 1 of 1 URL(s) answer"
    assert "warning" not in r.stdout  # member is indexed in the test slapd


def test_ldaps_and_a_user_that_is_not_there(tmp_path: Path, slapd: Slapd) -> None:
    path = config(tmp_path, slapd, [slapd.ldaps_url])
    r = check(path, "--user", "nobody")
    assert r.returncode == 0, r
    assert "TLS: ldaps, certificate and name verified" in r.stdout
    assert f"user 'nobody': not found under ou=people,{slapd.base_dn}" in r.stdout


def test_plain_ldap_is_said(tmp_path: Path, slapd: Slapd) -> None:
    r = check(config(tmp_path, slapd, [slapd.url]))
    assert r.returncode == 0, r
    assert "TLS: none (plain LDAP)" in r.stdout
    assert "user '" not in r.stdout  # no --user: no user search


def test_a_dead_port_is_exit_1_and_the_live_url_is_still_reported(tmp_path: Path,
                                                                  slapd: Slapd) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    r = check(config(tmp_path, slapd, [dead, slapd.url]), "--user", "bob")
    assert r.returncode == 1, r
    assert f"{dead}: unreachable after " in r.stdout
    assert "connection refused" in r.stdout
    assert f"{slapd.url}: user 'bob': found uid=bob,ou=people," in r.stdout
    assert "1 of 2 directory URL(s) failed" in r.stderr


def test_a_wrong_service_password_is_exit_1(tmp_path: Path, slapd: Slapd) -> None:
    r = check(config(tmp_path, slapd, [slapd.url], password="wrong"))
    assert r.returncode == 1, r
    assert f"the service account {slapd.svc_dn} cannot bind: result 49 invalidCredentials" in (
        r.stdout)


def test_a_wrong_ca_is_a_tls_failure(tmp_path: Path, slapd: Slapd) -> None:
    from tests.integration.slapd import make_ca

    other, _, _ = make_ca(tmp_path, "another CA")
    path = config(tmp_path, slapd, [slapd.ldaps_url])
    path.write_text(path.read_text().replace(slapd.ca_file, str(other)))
    r = check(path)
    assert r.returncode == 1, r
    assert "TLS certificate verification failed" in r.stdout, r.stdout


def test_a_bad_config_is_exit_2_before_connecting(tmp_path: Path, slapd: Slapd) -> None:
    path = config(tmp_path, slapd, [slapd.url], extra='user_filter = "(uid={username}"')
    r = check(path)
    assert r.returncode == 2, r
    assert r.stderr.startswith("config error: directory.user_filter: not an LDAP filter")


def test_user_needs_connect(tmp_path: Path, slapd: Slapd) -> None:
    path = config(tmp_path, slapd, [slapd.url])
    r = subprocess.run([MFA_PROXY, "check-config", "-c", str(path), "--user", "alice"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--user goes with --connect" in r.stderr


def test_a_local_users_file_has_nothing_to_connect_to(tmp_path: Path) -> None:
    (tmp_path / "users.toml").write_text("")
    path = tmp_path / "mfa-proxy.toml"
    path.write_text('[state]\nurl = "sqlite:///var/state.db"\nkey_file = "var/secret.key"\n'
                    '[directory]\ntype = "local"\nusers_file = "users.toml"\n')
    r = check(path, "--user", "alice")
    assert r.returncode == 0, r
    assert r.stdout.splitlines()[1:] == [
        f"directory: the local users file {tmp_path / 'users.toml'}: nothing to connect to",
        f"user 'alice': not found in {tmp_path / 'users.toml'}"]
