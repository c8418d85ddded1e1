"""Every config that `serve` refuses, `check-config` refuses too: the same line,
naming the key, and exit status 2 from both (PRODUCT.md, "Every config that
serve refuses...").

One table of broken files; each is given to the installed `mfa-proxy
check-config` and `mfa-proxy serve` (all at once: each process costs a second
of imports). A file serve accepted would keep running: it is killed after a
bound and the test fails.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.configs import STATE_AND_LOCAL_DIRECTORY, http_section, radius_section
from tests.integration.proxyproc import free_tcp_port
from tests.integration.slapd import make_ca, make_server_cert

pytestmark = pytest.mark.timeout(240)

MFA_PROXY = str(Path(sys.executable).with_name("mfa-proxy"))
WAIT = 120.0  # a bound, never an expectation


def base(root: Path) -> str:
    users = root / "users.toml"
    users.write_text("")
    return (STATE_AND_LOCAL_DIRECTORY + radius_section(free_tcp_port())
            + http_section(free_tcp_port()))


LDAP = """\
[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:1"]
user_base = "ou=people,dc=example,dc=org"
"""


def reply(attributes: str) -> Callable[[Path], str]:
    rule = f'\n[[radius.reply]]\ngroup = "vpn"\nattributes = {{ {attributes} }}\n'
    return lambda root: base(root) + rule


def ldap_directory(extra: str) -> Callable[[Path], str]:
    def build(root: Path) -> str:
        text = base(root)
        return text.replace('[directory]\ntype = "local"\nusers_file = "users.toml"\n',
                            LDAP + extra + "\n")
    return build


def portal_tls(cert: str, key: str) -> Callable[[Path], str]:
    def build(root: Path) -> str:
        (root / "portal.crt").write_text(cert)
        (root / "portal.key").write_text(key)
        (root / "portal.key").chmod(0o600)
        return base(root) + (f'\n[portal]\nlisten = "127.0.0.1:{free_tcp_port()}"\n'
                             'cert_file = "portal.crt"\nkey_file = "portal.key"\n')
    return build


def mismatched_ldaps(root: Path) -> str:
    ca, ca_key, ca_cert = make_ca(root)
    first = root / "one"
    second = root / "two"
    first.mkdir()
    second.mkdir()
    cert, _ = make_server_cert(first, ca_key, ca_cert)
    _, other_key = make_server_cert(second, ca_key, ca_cert)
    return base(root) + (f'\n[ldap]\nlisten = []\nldaps_listen = ["127.0.0.1:{free_tcp_port()}"]\n'
                         f'upstream = "ldap://127.0.0.1:1"\ncert_file = "{cert}"\n'
                         f'key_file = "{other_key}"\n')


def broken_key_file(root: Path) -> str:
    (root / "var").mkdir()
    (root / "var" / "secret.key").write_text("this is no key file\n")
    (root / "var" / "secret.key").chmod(0o600)
    return base(root)


def ca_without_certificate(root: Path) -> str:
    (root / "ca.pem").write_text("no certificate in here\n")
    return ldap_directory('ca_file = "ca.pem"\nstart_tls = true')(root)


# name: (how to write the file, the line both print, after "config error: ")
BROKEN: dict[str, tuple[Callable[[Path], str], str]] = {
    "reply_attribute_not_in_dictionary": (
        reply('Bogus-Attribute = "x"'),
        "radius.reply[0].attributes.Bogus-Attribute: not in the RADIUS dictionary"),
    "reply_attribute_value_type": (
        reply('Session-Timeout = "soon"'),
        "radius.reply[0].attributes.Session-Timeout: 'soon': Can not encode non-integer as "
        "integer"),
    "reply_attribute_of_the_proxy": (
        reply('State = "x"'), "radius.reply[0].attributes.State: written by the proxy itself"),
    "user_filter_unbalanced": (
        ldap_directory('user_filter = "(uid={username}"'), "directory.user_filter: not an LDAP"),
    "group_filter_without_dn": (
        ldap_directory('group_filter = "(member=x)"'),
        "directory.group_filter: must contain {dn} or {username} in a value"),
    "portal_cert_not_pem": (
        portal_tls("not a certificate", "not a key"), "portal.cert_file: "),
    "ldaps_key_of_another_certificate": (
        mismatched_ldaps, "ldap.key_file: "),
    "key_file_broken": (broken_key_file, "state.key_file: "),
    "ca_file_without_certificate": (ca_without_certificate, "directory.ca_file: "),
    "mistyped_key": (
        lambda root: base(root).replace("[http]\n", "[http]\nlisen = 1\n"),
        "http.lisen: unknown key (did you mean listen?)"),
    "dictionary_renumbering_state": (
        lambda root: (root / "dictionary").write_text("ATTRIBUTE\tState\t99\toctets\n") and
        base(root).replace("[radius]\n", '[radius]\ndictionary = "dictionary"\n'),
        "radius.dictionary: cannot load the RADIUS dictionary: ValueError: RADIUS dictionary: "
        "State is 99, RFC says 24"),
    "cidr": (
        lambda root: base(root).replace('"127.0.0.0/8"', '"127.0.0.0/33"'),
        "radius.clients[0].address: not an address or CIDR: '127.0.0.0/33'"),
}


def test_check_config_and_serve_refuse_the_same_files(tmp_path: Path) -> None:
    procs: dict[tuple[str, str], subprocess.Popen[str]] = {}
    for name, (build, _) in BROKEN.items():
        root = tmp_path / name
        root.mkdir()
        config = root / "mfa-proxy.toml"
        config.write_text(build(root))
        for command in ("check-config", "serve"):
            procs[name, command] = subprocess.Popen(
                [MFA_PROXY, command, "-c", str(config)], cwd=root, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failures = []
    for (name, command), p in procs.items():
        try:
            out, err = p.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            failures.append(f"{name}: {command} accepted the file and kept running")
            continue
        expected = "config error: " + BROKEN[name][1]
        if p.returncode != 2 or not any(line.startswith(expected) for line in err.splitlines()):
            failures.append(f"{name}: {command} exited {p.returncode}, wanted 2 and a line "
                            f"starting {expected!r}:\n{out}{err}")
    assert not failures, "\n".join(failures)
    # nothing was built from a refused file
    assert not any((tmp_path / name / "var" / "state.db").exists() for name in BROKEN)
