"""TOML → settings: every problem names its key, all are reported at once."""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path

import pytest

from proxy.config import (
    Address,
    ConfigError,
    find_config,
    load,
    parse_address,
)
from proxy.data import config_text, example_names
from tests.configs import STATE_AND_LOCAL_DIRECTORY, radius_section

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "conf" / "mfa-proxy.toml"

BASE = STATE_AND_LOCAL_DIRECTORY
RADIUS = radius_section(18120)


def write(tmp_path: Path, text: str, name: str = "mfa-proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


# -- good files -------------------------------------------------------------------------


def test_minimal_file_loads_with_defaults(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE))
    assert s.path == tmp_path / "mfa-proxy.toml"
    assert (s.totp.digits, s.totp.period, s.totp.window) == (6, 30, 1)
    assert (s.policy.max_failures, s.policy.lockout_seconds, s.policy.enrollment_days) == (
        5, 900, 7)
    assert s.radius is None and s.ldap is None
    assert s.http.listen is None  # no [http] section: no HTTP listener
    assert s.warnings == ()


def test_http_section_defaults_to_loopback_9812(tmp_path: Path) -> None:
    assert load(write(tmp_path, BASE + "[http]\n")).http.listen == Address("127.0.0.1", 9812)


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load(write(conf, BASE))
    assert s.state.url == f"sqlite:///{conf / 'var' / 'state.db'}"
    assert s.state.key_file == conf / "var" / "secret.key"
    assert s.directory.users_file == conf / "users.toml"


def test_parent_relative_paths(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    s = load(write(conf, BASE.replace('"var/', '"../var/').replace(":///var/", ":///../var/")))
    assert s.state.key_file == tmp_path / "var" / "secret.key"
    assert s.state.url == f"sqlite:///{tmp_path / 'var' / 'state.db'}"


def test_postgresql_url_is_kept(tmp_path: Path) -> None:
    url = "postgresql+psycopg://mfa:pw@db.example.org:5432/mfa"
    s = load(write(tmp_path, BASE.replace('"sqlite:///var/state.db"', f'"{url}"')))
    assert s.state.url == url


def test_radius_section(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE + RADIUS + """
[[radius.clients]]
name = "pam"
address = ["10.0.1.5", "2001:db8::/32"]
secret = "another-long-radius-secret"
mode = "append"
separator = ""
mfa = "strict"
require_message_authenticator = false
repeat_window_seconds = 30
"""))
    assert s.radius is not None
    r = s.radius
    assert r.listen == (Address("127.0.0.1", 18120),)
    assert r.accounting_listen == (Address("127.0.0.1", 18121),)  # auth port + 1
    vpn, pam = r.clients
    assert (vpn.name, vpn.mfa, vpn.mode, vpn.separator) == ("vpn", "enrolled", "auto", ",")
    assert vpn.require_message_authenticator
    assert vpn.nas_secret == b"a-long-enough-radius-secret"
    assert [str(n) for n in pam.networks] == ["10.0.1.5/32", "2001:db8::/32"]
    assert (pam.mode, pam.separator, pam.mfa) == ("append", "", "strict")
    assert not pam.require_message_authenticator
    assert pam.repeat_window_seconds == 30


def test_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "vpn.secret").write_text("  from-a-file-secret-123\n")
    s = load(write(tmp_path, BASE + RADIUS.replace(
        'secret = "a-long-enough-radius-secret"', 'secret_file = "vpn.secret"')))
    assert s.radius is not None
    assert s.radius.clients[0].nas_secret == b"from-a-file-secret-123"


def test_create_secret_file_makes_a_private_random_secret(tmp_path: Path) -> None:
    text = BASE + RADIUS.replace('secret = "a-long-enough-radius-secret"',
                                 'secret_file = "var/vpn.secret"\ncreate_secret_file = true')
    first = load(write(tmp_path, text))
    path = tmp_path / "var" / "vpn.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.radius is not None
    secret = first.radius.clients[0].nas_secret
    assert len(secret) >= 24
    second = load(write(tmp_path, text))  # the second start reads the same one
    assert second.radius is not None and second.radius.clients[0].nas_secret == secret


def test_short_radius_secret_is_a_warning(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE + RADIUS.replace("a-long-enough-radius-secret", "short")))
    assert len(s.warnings) == 1
    assert s.warnings[0].startswith("radius.clients[0].secret: shorter than 16 characters")


def test_ipv6_listen_address(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE + '[http]\nlisten = "[::1]:9900"\n'))
    assert s.http.listen == Address("::1", 9900)
    assert str(s.http.listen) == "[::1]:9900"


def test_http_listen_can_be_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, BASE + '[http]\nlisten = ""\n')).http.listen is None


def test_http_admin_networks(tmp_path: Path) -> None:
    import ipaddress

    assert load(write(tmp_path, BASE + "[http]\n")).http.admin_networks == ()  # loopback only
    s = load(write(tmp_path, BASE + '[http]\nadmin_networks = ["10.0.0.0/8", "192.0.2.7", '
                                    '"2001:db8::/32"]\n'))
    assert s.http.admin_networks == tuple(ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"))


def test_http_admin_networks_errors_name_the_key(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + '[http]\nadmin_networks = ["10.0.0.0/8", "intranet"]\n') \
        == ["http.admin_networks: not an address or CIDR: 'intranet'"]
    assert problems(tmp_path, BASE + "[http]\nadmin_networks = [10]\n") \
        == ["http.admin_networks: expected a list of strings, found 10"]


def test_ldap_upstream_defaults_to_the_directory(tmp_path: Path) -> None:
    text = """\
[state]
url = "sqlite:///state.db"
[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:3890", "ldap://127.0.0.2:3890"]
user_base = "ou=people,dc=example,dc=org"
[ldap]
listen = ["127.0.0.1:3389"]
"""
    s = load(write(tmp_path, text))
    assert s.ldap is not None and s.ldap.upstream == "ldap://127.0.0.1:3890"
    assert s.directory.ldap is not None
    assert s.directory.ldap.urls == ["ldap://127.0.0.1:3890", "ldap://127.0.0.2:3890"]


def test_default_config_loads(tmp_path: Path) -> None:
    """conf/mfa-proxy.toml, copied so its var/ (a generated RADIUS secret) is ours."""
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(DEFAULT_CONFIG, conf / "mfa-proxy.toml")
    s = load(conf / "mfa-proxy.toml")
    assert s.state.url == f"sqlite:///{tmp_path / 'var' / 'mfa-proxy.db'}"
    assert s.directory.type == "local"
    assert s.directory.users_file == tmp_path / "var" / "users.toml"
    assert s.http.listen == Address("127.0.0.1", 9812)
    assert s.radius is not None
    assert [c.name for c in s.radius.clients] == ["localhost"]
    assert (tmp_path / "var" / "radius-localhost.secret").is_file()
    every = [a.host for a in s.radius.listen] + [s.http.listen.host]
    assert all(h in ("127.0.0.1", "::1") for h in every)  # loopback only


@pytest.mark.parametrize("name", ["ldap", "docker"])
def test_an_example_only_lacks_its_files(tmp_path: Path, name: str) -> None:
    """conf/examples/*.toml name files under /etc (secrets); nothing else may be wrong."""
    shutil.copy(REPO / "conf" / "examples" / f"{name}.toml", tmp_path / f"{name}.toml")
    with pytest.raises(ConfigError) as e:
        load(tmp_path / f"{name}.toml")
    for line in e.value.problems:
        assert "cannot read /etc/" in line, line


def test_the_packaged_files_are_the_ones_in_conf() -> None:
    """proxy/data/ (package data, what a pip install gets) links to conf/: one copy."""
    assert config_text() == DEFAULT_CONFIG.read_text(encoding="utf-8")
    names = sorted(p.stem for p in (REPO / "conf" / "examples").glob("*.toml"))
    assert example_names() == names == ["docker", "ldap"]
    for name in names:
        assert config_text(name) == (REPO / "conf" / "examples" / f"{name}.toml").read_text()


# -- which file, without -c ---------------------------------------------------------------


def test_search_order_env_then_conf_then_etc(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "conf" / "mfa-proxy.toml"
    named = write(tmp_path, BASE, "named.toml")
    with pytest.raises(ConfigError) as e:
        find_config({}, tmp_path)
    assert e.value.problems == [
        f"no config file: $MFA_PROXY_CONFIG is not set and none of {here}, "
        "/etc/mfa-proxy/mfa-proxy.toml exists; give one with -c FILE, or write the "
        "packaged default with `mfa-proxy init-config` (to ./conf/mfa-proxy.toml)"]
    here.parent.mkdir()
    here.write_text(BASE)
    assert find_config({}, tmp_path) == here
    assert find_config({"MFA_PROXY_CONFIG": ""}, tmp_path) == here  # empty = not set
    assert find_config({"MFA_PROXY_CONFIG": str(named)}, tmp_path) == named
    # a variable naming a missing file is an error, not a reason to run another config
    with pytest.raises(ConfigError) as e:
        find_config({"MFA_PROXY_CONFIG": str(tmp_path / "gone.toml")}, tmp_path)
    assert e.value.problems == [f"{tmp_path / 'gone.toml'}: no such file "
                                "(named by $MFA_PROXY_CONFIG)"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MFA_PROXY_CONFIG", raising=False)
    assert load().path == here  # load() without a path searches


def test_etc_is_the_last_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = write(tmp_path, BASE, "etc.toml")
    monkeypatch.setattr("proxy.config.CONFIG_SEARCH_PATH",
                        (Path("conf/mfa-proxy.toml"), etc))
    assert find_config({}, tmp_path) == etc


# -- broken files: each message ------------------------------------------------------------


def test_postgres_without_its_driver_names_the_extra(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg: ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    pg = BASE.replace('"sqlite:///var/state.db"', '"postgresql+psycopg://mfa@db/mfa"')
    assert problems(tmp_path, pg) == [
        "state.url: PostgreSQL needs the psycopg driver, which is not installed: "
        "pip install 'mfa-proxy[postgres]'"]
    bare = BASE.replace('"sqlite:///var/state.db"', '"postgresql://mfa@db/mfa"')
    assert problems(tmp_path, bare) == [
        "state.url: postgresql:// needs the psycopg2 driver, which is not installed; "
        "use postgresql+psycopg://… with pip install 'mfa-proxy[postgres]'"]
    odd = BASE.replace('"sqlite:///var/state.db"', '"postgresql+../x://db/mfa"')
    assert problems(tmp_path, odd) == [
        "state.url: unsupported database URL 'postgresql+../x' "
        "(use sqlite:///PATH or postgresql+psycopg://…)"]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert problems(tmp_path, "bogus = 1\n" + BASE) == ["bogus: unknown key"]


def test_unknown_key_in_a_section(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + "[policy]\nmax_failure = 5\n") == [
        "policy.max_failure: unknown key (did you mean max_failures?)"]


def test_unknown_key_in_a_radius_client(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + RADIUS + 'secrte = "x"\n') == [
        "radius.clients[0].secrte: unknown key (did you mean secret?)"]


def test_unknown_section(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + "[radios]\nlisten = []\n") == [
        "radios: unknown key (did you mean radius?)"]


@pytest.mark.parametrize(("snippet", "message"), [
    ('[policy]\nmax_failures = "5"\n',
     "policy.max_failures: expected an integer, got string '5'"),
    ("[policy]\nmax_failures = true\n",
     "policy.max_failures: expected an integer, got boolean True"),
    ("[policy]\nlockout_seconds = 1.5\n",
     "policy.lockout_seconds: expected an integer, got float 1.5"),
    ("[totp]\nissuer = 7\n", "totp.issuer: expected a string, got integer 7"),
    ('[radius]\nrequire_message_authenticator = "yes"\n',
     "radius.require_message_authenticator: expected true or false, got string 'yes'"),
    ("[http]\nlisten = 9812\n", "http.listen: expected a string, got integer 9812"),
    ("[ldap]\nupstream = \"ldap://127.0.0.1\"\nexempt = [1]\n",
     "ldap.exempt: expected a list of strings, found 1"),
    ("[policy]\nmax_failures = []\n", "policy.max_failures: expected an integer, got array []"),
])
def test_wrong_type(tmp_path: Path, snippet: str, message: str) -> None:
    assert message in problems(tmp_path, BASE + snippet)


@pytest.mark.parametrize(("value", "message"), [
    (400, "policy.enrollment_days: must be between 1 and 365, got 400"),
    (0, "policy.enrollment_days: must be between 1 and 365, got 0"),
    (-7, "policy.enrollment_days: must be between 1 and 365, got -7"),
])
def test_enrollment_days_out_of_range(tmp_path: Path, value: int, message: str) -> None:
    assert problems(tmp_path, BASE + f"[policy]\nenrollment_days = {value}\n") == [message]


@pytest.mark.parametrize(("snippet", "message"), [
    ("[totp]\ndigits = 5\n", "totp.digits: must be between 6 and 8, got 5"),
    ("[totp]\nwindow = 11\n", "totp.window: must be between 0 and 10, got 11"),
    ("[policy]\nmax_failures = 0\n", "policy.max_failures: must be between 1 and 1000, got 0"),
    ("[policy]\nlockout_seconds = -1\n", "policy.lockout_seconds: must be between 0 and"),
])
def test_other_ranges(tmp_path: Path, snippet: str, message: str) -> None:
    found = problems(tmp_path, BASE + snippet)
    assert len(found) == 1 and found[0].startswith(message)


@pytest.mark.parametrize("address", ["10.0.0.0/33", "10.0.0.300", "vpn.example.org",
                                     "2001:db8::/129", ""])
def test_bad_cidr(tmp_path: Path, address: str) -> None:
    text = BASE + RADIUS.replace('"127.0.0.0/8"', f'"{address}"')
    assert f"radius.clients[0].address: not an address or CIDR: {address!r}" in problems(
        tmp_path, text)


def test_bad_cidr_among_good_ones(tmp_path: Path) -> None:
    text = BASE + RADIUS.replace('"127.0.0.0/8"', '["127.0.0.1", "192.168.1.0/24x"]')
    assert problems(tmp_path, text) == [
        "radius.clients[0].address: not an address or CIDR: '192.168.1.0/24x'"]


def test_unreadable_secret_file(tmp_path: Path) -> None:
    text = BASE + RADIUS.replace('secret = "a-long-enough-radius-secret"',
                                 'secret_file = "nowhere/vpn.secret"')
    missing = tmp_path / "nowhere" / "vpn.secret"
    assert problems(tmp_path, text) == [
        f"radius.clients[0].secret_file: cannot read {missing}: No such file or directory"]


def test_secret_file_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    text = BASE + RADIUS.replace('secret = "a-long-enough-radius-secret"',
                                 'secret_file = "adir"')
    [line] = problems(tmp_path, text)
    assert line.startswith(f"radius.clients[0].secret_file: cannot read {tmp_path / 'adir'}")


def test_empty_secret_file(tmp_path: Path) -> None:
    (tmp_path / "empty.secret").write_text("\n")
    text = BASE + RADIUS.replace('secret = "a-long-enough-radius-secret"',
                                 'secret_file = "empty.secret"')
    assert problems(tmp_path, text) == [
        f"radius.clients[0].secret_file: {tmp_path / 'empty.secret'} is empty"]


def test_secret_and_secret_file_both(tmp_path: Path) -> None:
    (tmp_path / "vpn.secret").write_text("from-a-file-secret-123\n")
    text = BASE + RADIUS + 'secret_file = "vpn.secret"\n'
    assert problems(tmp_path, text) == [
        "radius.clients[0].secret: give either secret or secret_file, not both"]


def test_missing_client_secret(tmp_path: Path) -> None:
    text = BASE + RADIUS.replace('secret = "a-long-enough-radius-secret"\n', "")
    assert problems(tmp_path, text) == [
        "radius.clients[0].secret: missing (set secret or secret_file)"]


def test_unreadable_bind_password_file(tmp_path: Path) -> None:
    text = """\
[state]
url = "sqlite:///state.db"
[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:3890"]
bind_dn = "cn=svc,dc=example,dc=org"
bind_password_file = "bind.secret"
user_base = "ou=people,dc=example,dc=org"
"""
    assert problems(tmp_path, text) == [
        f"directory.bind_password_file: cannot read {tmp_path / 'bind.secret'}: "
        "No such file or directory"]


def test_missing_state_section(tmp_path: Path) -> None:
    text = BASE.split("[directory]")[1]
    assert problems(tmp_path, "[directory]" + text) == ["state: missing section [state]"]


def test_missing_directory_section(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE.split("[directory]")[0]) == [
        "directory: missing section [directory]"]


def test_empty_file(tmp_path: Path) -> None:
    assert problems(tmp_path, "") == ["state: missing section [state]",
                                      "directory: missing section [directory]"]


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    assert problems(tmp_path, "policy = 5\n" + BASE) == ["policy: expected a table, got integer"]


@pytest.mark.parametrize(("listen", "message"), [
    ("localhost:9812", "http.listen: not an IP address: 'localhost' in 'localhost:9812'"),
    ("127.0.0.1", "http.listen: expected HOST:PORT (IPv6 as [::1]:PORT), got '127.0.0.1'"),
    ("127.0.0.1:http", "http.listen: expected HOST:PORT (IPv6 as [::1]:PORT), got "
                       "'127.0.0.1:http'"),
    ("127.0.0.1:70000", "http.listen: port out of range in '127.0.0.1:70000'"),
    ("127.0.0.1:0", "http.listen: port out of range in '127.0.0.1:0'"),
    ("::1:9812", "http.listen: an IPv6 address needs brackets, as [::1]:PORT, got '::1:9812'"),
    ("[::1:9812", "http.listen: an IPv6 address needs brackets, as [::1]:PORT, got "
                  "'[::1:9812'"),
])
def test_bad_listen_address(tmp_path: Path, listen: str, message: str) -> None:
    assert problems(tmp_path, BASE + f'[http]\nlisten = "{listen}"\n') == [message]


def test_bad_radius_listen_address(tmp_path: Path) -> None:
    text = BASE + RADIUS.replace('["127.0.0.1:18120"]', '["127.0.0.1:18120", "0.0.0.0"]')
    assert problems(tmp_path, text) == [
        "radius.listen: expected HOST:PORT (IPv6 as [::1]:PORT), got '0.0.0.0'"]


def test_invalid_toml(tmp_path: Path) -> None:
    [line] = problems(tmp_path, BASE + "[policy\nmax_failures = 5\n")
    assert line.startswith(f"{tmp_path / 'mfa-proxy.toml'}: not valid TOML: ")
    assert "line 8" in line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "absent.toml")
    assert e.value.problems == [f"{tmp_path / 'absent.toml'}: no such file"]


@pytest.mark.parametrize(("snippet", "message"), [
    ('[radius]\nmode = "push"\n',
     "radius.mode: must be one of 'append', 'challenge', 'auto', got 'push'"),
    ('[directory]\ntype = "ad"\n',
     "directory.type: must be one of 'local', 'ldap', got 'ad'"),
])
def test_bad_choice(tmp_path: Path, snippet: str, message: str) -> None:
    text = BASE.split("[directory]")[0] + snippet if "directory" in snippet else BASE + snippet
    assert message in problems(tmp_path, text)


def test_bad_mfa_choice_in_a_client(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + RADIUS + 'mfa = "sometimes"\n') == [
        "radius.clients[0].mfa: must be one of 'enrolled', 'strict', 'off', got 'sometimes'"]


def test_radius_without_clients(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + '[radius]\nlisten = ["127.0.0.1:18120"]\n') == [
        "radius.clients: no [[radius.clients]]: every request would be dropped"]


def test_duplicate_client_names(tmp_path: Path) -> None:
    text = BASE + RADIUS + RADIUS.split("[radius]\nlisten = [\"127.0.0.1:18120\"]\n")[1]
    assert problems(tmp_path, text) == ["radius.clients: duplicate client name 'vpn'"]


def test_unsupported_database_url(tmp_path: Path) -> None:
    text = BASE.replace('"sqlite:///var/state.db"', '"mysql://db/mfa"')
    assert problems(tmp_path, text) == [
        "state.url: unsupported database URL 'mysql' "
        "(use sqlite:///PATH or postgresql+psycopg://…)"]


def test_ldap_directory_requirements(tmp_path: Path) -> None:
    text = """\
[state]
url = "sqlite:///state.db"
[directory]
type = "ldap"
urls = ["http://dc1"]
bind_dn = "cn=svc,dc=example,dc=org"
user_filter = "(uid=%s)"
"""
    assert problems(tmp_path, text) == [
        "directory.urls: not an ldap:// or ldaps:// URL: 'http://dc1'",
        "directory.bind_password: missing (set bind_password or bind_password_file)",
        "directory.user_base: missing: the DN under which users are searched",
        "directory.user_filter: must contain {username}",
    ]


def test_ldap_upstream_missing_with_a_local_directory(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE + '[ldap]\nlisten = ["127.0.0.1:3389"]\n') == [
        "ldap.upstream: missing (no [directory] LDAP url to default to)"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
bogus = true
[state]
url = "sqlite:///state.db"
key_file = 5
[policy]
enrollment_days = 400
max_failures = "five"
[directory]
type = "local"
[http]
listen = "localhost:1"
[radius]
listen = ["127.0.0.1:18120"]
[[radius.clients]]
name = "vpn"
address = "10.0.0.0/33"
secret_file = "missing.secret"
"""
    found = problems(tmp_path, text)
    assert sorted(found) == sorted([
        "state.key_file: expected a string, got integer 5",
        "policy.enrollment_days: must be between 1 and 365, got 400",
        "policy.max_failures: expected an integer, got string 'five'",
        "radius.clients[0].address: not an address or CIDR: '10.0.0.0/33'",
        f"radius.clients[0].secret_file: cannot read {tmp_path / 'missing.secret'}: "
        "No such file or directory",
        "http.listen: not an IP address: 'localhost' in 'localhost:1'",
        "bogus: unknown key",
    ])


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:1812") == Address("127.0.0.1", 1812)
    assert parse_address("[::1]:1812") == Address("::1", 1812)
    assert parse_address("[2001:db8::1]:389") == Address("2001:db8::1", 389)
    with pytest.raises(ValueError):
        parse_address("[::1]")


def test_ldap_user_base_defaults_to_the_directory_user_base(tmp_path: Path) -> None:
    text = """
[state]
url = "sqlite:///s.db"
[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:3890"]
user_base = "ou=people,dc=example,dc=org"
[ldap]
listen = ["127.0.0.1:3389"]
"""
    (tmp_path / "c.toml").write_text(text)
    s = load(tmp_path / "c.toml")
    assert s.ldap is not None and s.ldap.user_base == "ou=people,dc=example,dc=org"
    (tmp_path / "d.toml").write_text(text + 'user_base = "dc=example,dc=org"\n')
    assert load(tmp_path / "d.toml").ldap.user_base == "dc=example,dc=org"


def test_logging_decisions(tmp_path: Path) -> None:
    assert load(write(tmp_path, BASE)).log_decisions == "rejects"
    s = load(write(tmp_path, BASE + '\n[logging]\nlevel = "debug"\ndecisions = "all"\n'))
    assert (s.log_level, s.log_decisions) == ("debug", "all")
    found = problems(tmp_path, BASE + '\n[logging]\ndecisions = "accepts"\n')
    assert len(found) == 1 and found[0].startswith("logging.decisions")


LDAP = BASE + '\n[ldap]\nupstream = "ldap://127.0.0.1:389"\n'


def test_ldap_hardening_defaults(tmp_path: Path) -> None:
    s = load(write(tmp_path, LDAP))
    assert s.ldap is not None
    assert s.ldap.require_bind is True and s.ldap.sasl_passthrough is False
    assert s.ldap.max_message_size == 256 * 1024
    assert s.ldap.max_connections_per_source == 64
    assert s.ldap.max_buffered_bytes == 64 * 1024 * 1024
    assert s.ldap.unbound_timeout == 10.0
    assert s.warnings == ()


def test_ldap_require_bind_defaults_off_only_with_allow_anonymous(tmp_path: Path) -> None:
    s = load(write(tmp_path, LDAP + "allow_anonymous = true\n"))
    assert s.ldap is not None and s.ldap.require_bind is False
    s = load(write(tmp_path, LDAP + "allow_anonymous = true\nrequire_bind = true\n"))
    assert s.ldap is not None and s.ldap.require_bind is True
    s = load(write(tmp_path, LDAP + "require_bind = false\n"))
    assert s.ldap is not None and s.ldap.require_bind is False


def test_ldap_sasl_passthrough_loads_with_a_warning(tmp_path: Path) -> None:
    s = load(write(tmp_path, LDAP + "sasl_passthrough = true\n"))
    assert s.ldap is not None and s.ldap.sasl_passthrough is True
    (warning,) = s.warnings
    assert warning.startswith("ldap.sasl_passthrough:") and "MFA is bypassed" in warning


@pytest.mark.parametrize(("snippet", "message"), [
    ("max_connections_per_source = 0",
     "ldap.max_connections_per_source: must be between 1 and 100000, got 0"),
    ('max_connections_per_source = "64"',
     "ldap.max_connections_per_source: expected an integer, got string '64'"),
    ("unbound_timeout = -1", "ldap.unbound_timeout: must be between 0 and 3600, got -1"),
    ("unbound_timeout = true", "ldap.unbound_timeout: expected a number, got boolean True"),
    ("max_buffered_bytes = 1024", "ldap.max_buffered_bytes: must be between 65536 and"),
    ("max_buffered_bytes = 100000",
     "ldap.max_buffered_bytes: must be at least max_message_size (262144), got 100000"),
    ("max_message_size = 100", "ldap.max_message_size: must be between 1024 and"),
    ('sasl_passthrough = "yes"', "ldap.sasl_passthrough: expected true or false, got string"),
])
def test_ldap_hardening_keys_are_checked(tmp_path: Path, snippet: str, message: str) -> None:
    found = problems(tmp_path, LDAP + snippet + "\n")
    assert len(found) == 1 and found[0].startswith(message), found


def test_ldap_section_passes_the_front_end_checks_too(tmp_path: Path) -> None:
    """What check-config accepts, the front-end accepts (serve builds it from these)."""
    from proxy.ldap.config import LdapFrontendConfig

    s = load(write(tmp_path, LDAP + "max_message_size = 65536\nmax_buffered_bytes = 65536\n"))
    assert s.ldap is not None
    config = LdapFrontendConfig(
        upstream=s.ldap.upstream, max_message_size=s.ldap.max_message_size,
        max_buffered_bytes=s.ldap.max_buffered_bytes,
        max_connections_per_source=s.ldap.max_connections_per_source,
        unbound_timeout=s.ldap.unbound_timeout, require_bind=s.ldap.require_bind)
    assert config.problems() == []
    assert LdapFrontendConfig(max_connections_per_source=0, unbound_timeout=-1,
                              max_buffered_bytes=10).problems() == [
        "ldap.max_connections_per_source: must be at least 1",
        "ldap.max_buffered_bytes: must be at least ldap.max_message_size",
        "ldap.unbound_timeout: must be 0 or more",
    ]


def test_ldap_username_attribute_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """The entry a bind DN names is resolved by the directory; the old key stays
    accepted so configs keep loading, and check-config says it does nothing."""
    path = tmp_path / "c.toml"
    path.write_text('[state]\nurl = "sqlite:///x.db"\n[directory]\ntype = "local"\n'
                    'users_file = "u.toml"\n[ldap]\nupstream = "ldap://127.0.0.1:389"\n'
                    'username_attribute = "cn"\n')
    settings = load(str(path))
    assert any("ldap.username_attribute" in w and "ignored" in w for w in settings.warnings)


def test_ldap_filters_are_checked_as_the_client_parses_them(tmp_path: Path) -> None:
    """check-config refuses what the directory client would refuse at start-up."""
    text = """\
[state]
url = "sqlite:///state.db"
[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:389"]
user_base = "ou=people,dc=example,dc=org"
user_filter = "(&(uid={username})(objectClass=person)"
group_filter = "(member={dn}"
"""
    found = problems(tmp_path, text)
    assert any(p.startswith("directory.user_filter: not an LDAP filter") for p in found), found
    assert any(p.startswith("directory.group_filter: not an LDAP filter") for p in found), found


# -- [portal] ------------------------------------------------------------------------------


def test_no_portal_section_or_empty_listen_means_no_portal(tmp_path: Path) -> None:
    assert load(write(tmp_path, BASE)).portal is None
    assert load(write(tmp_path, BASE + '[portal]\nlisten = ""\n')).portal is None


def test_portal_section_loads(tmp_path: Path) -> None:
    (tmp_path / "portal.crt").write_text("x")
    (tmp_path / "portal.key").write_text("x")
    (tmp_path / "portal.key").chmod(0o600)
    s = load(write(tmp_path, BASE + '[portal]\nlisten = "0.0.0.0:8443"\ncert_file = "portal.crt"\n'
                   'key_file = "portal.key"\npublic_url = "https://mfa.example.org/"\n'
                   "session_minutes = 30\n"))
    p = s.portal
    assert p is not None
    assert (p.listen, p.cert_file, p.key_file, p.public_url, p.session_minutes, p.tls) == (
        Address("0.0.0.0", 8443), tmp_path / "portal.crt", tmp_path / "portal.key",
        "https://mfa.example.org/", 30, True)
    assert s.warnings == ()


def test_portal_defaults(tmp_path: Path) -> None:
    p = load(write(tmp_path, BASE + "[portal]\n")).portal
    assert p is not None
    assert (p.listen, p.tls, p.public_url, p.session_minutes) == (
        Address("127.0.0.1", 8443), False, "", 15)


def test_plain_http_portal_on_a_non_loopback_address_is_a_warning(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE + '[portal]\nlisten = "0.0.0.0:8080"\n'))
    (warning,) = s.warnings
    assert warning.startswith("portal.listen: the portal is plain HTTP on 0.0.0.0:8080")
    assert load(write(tmp_path, BASE + '[portal]\nlisten = "[::1]:8080"\n')).warnings == ()


@pytest.mark.parametrize(("snippet", "message"), [
    ('listen = "portal.example.org:443"', "portal.listen: not an IP address"),
    ('cert_file = "missing.crt"', "portal.key_file: TLS needs both cert_file and key_file"),
    ('key_file = "missing.key"', "portal.cert_file: TLS needs both cert_file and key_file"),
    ('cert_file = "missing.crt"\nkey_file = "missing.key"', "portal.cert_file: cannot read"),
    ('public_url = "mfa.example.org"', "portal.public_url: expected an http:// or https:// URL"),
    ("session_minutes = 0", "portal.session_minutes: must be between 1 and 1440, got 0"),
    ("colour = 1", "portal.colour: unknown key"),
])
def test_portal_problems_name_their_key(tmp_path: Path, snippet: str, message: str) -> None:
    found = problems(tmp_path, BASE + "[portal]\n" + snippet + "\n")
    assert any(p.startswith(message) for p in found), found


# -- [mail] -------------------------------------------------------------------------------


def test_mail_section_with_its_defaults(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE + '[mail]\nsmtp = "smtp.example.org:587"\n'
                   'from = "MFA <mfa@example.org>"\n'))
    m = s.mail
    assert m is not None
    assert (m.host, m.port, m.security, m.tls_verify, m.reminder_hours) == (
        "smtp.example.org", 587, "starttls", True, 24)
    assert m.envelope_from == "mfa@example.org"
    assert set(m.templates) == {"required", "reminder", "extended", "reset", "enrolled",
                                "user_reset", "test"}
    assert (m.retry.first_seconds, m.retry.give_up_seconds, m.claim_seconds) == (
        60, 48 * 3600, 300)


def test_no_mail_section_or_an_empty_smtp_is_no_mail(tmp_path: Path) -> None:
    assert load(write(tmp_path, BASE)).mail is None
    assert load(write(tmp_path, BASE + '[mail]\nsmtp = ""\n')).mail is None


@pytest.mark.parametrize(("value", "security", "expected"), [
    ("mail.example.org", "tls", ("mail.example.org", 465)),
    ("127.0.0.1:2525", "none", ("127.0.0.1", 2525)),
    ("[::1]:25", "starttls", ("::1", 25)),
])
def test_smtp_host_and_port(tmp_path: Path, value: str, security: str,
                            expected: tuple[str, int]) -> None:
    s = load(write(tmp_path, BASE + f'[mail]\nsmtp = "{value}"\nsecurity = "{security}"\n'
                   'from = "mfa@example.org"\n'))
    assert s.mail is not None and (s.mail.host, s.mail.port) == expected


def test_mail_problems_name_their_keys(tmp_path: Path) -> None:
    found = problems(tmp_path, BASE + '[mail]\nsmtp = "a:b:c"\nsecurity = "ssl"\n'
                     'reminder_hours = -1\nusername = "u"\nclaim_seconds = 10\n'
                     'templates = "missing"\nbogus = 1\n')
    keys = sorted(p.partition(":")[0] for p in found)
    assert keys == ["mail.bogus", "mail.reminder_hours", "mail.security", "mail.smtp",
                    "mail.templates"], found
    found = problems(tmp_path, BASE + '[mail]\nsmtp = "127.0.0.1:25"\nusername = "u"\n'
                     'claim_seconds = 10\n')
    assert sorted(p.partition(":")[0] for p in found) == [
        "mail.claim_seconds", "mail.from", "mail.password_file"], found


def test_a_template_folder_overrides_and_is_checked(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "reminder.txt").write_text("Subject: $username!\n\n$deadline\n")
    (tmp_path / "mail" / "reminder.html").write_text("<p>$username</p>\n")
    s = load(write(tmp_path, BASE + '[mail]\nsmtp = "127.0.0.1:25"\nfrom = "m@example.org"\n'
                   'templates = "mail"\n'))
    assert s.mail is not None
    reminder = s.mail.templates["reminder"]
    assert (reminder.subject, reminder.html) == ("$username!", "<p>$username</p>\n")
    assert "Security notice" in s.mail.templates["enrolled"].subject  # the packaged one
    (tmp_path / "mail" / "reminder.txt").write_text("Subject: $user\n\nx\n")
    [problem] = problems(tmp_path, BASE + '[mail]\nsmtp = "127.0.0.1:25"\n'
                         'from = "m@example.org"\ntemplates = "mail"\n')
    assert problem.startswith("mail.templates: ") and "unknown placeholder $user" in problem


def test_auth_in_clear_and_no_verification_are_warnings(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    s = load(write(tmp_path, BASE + '[mail]\nsmtp = "mail.example.org:25"\nsecurity = "none"\n'
                   'from = "m@example.org"\nusername = "u"\npassword_file = "pw"\n'))
    assert s.mail is not None and s.mail.password == "secret"
    assert any(w.startswith("mail.security:") for w in s.warnings)
    s = load(write(tmp_path, BASE + '[mail]\nsmtp = "mail.example.org"\n'
                   'from = "m@example.org"\ntls_verify = false\n'))
    assert any(w.startswith("mail.tls_verify:") for w in s.warnings)


def test_directory_mail_attribute(tmp_path: Path) -> None:
    ldap = BASE.replace('type = "local"\nusers_file = "users.toml"\n',
                        'type = "ldap"\nurls = ["ldap://127.0.0.1:389"]\n'
                        'user_base = "ou=people,dc=example,dc=org"\n')
    s = load(write(tmp_path, ldap))
    assert s.directory.ldap is not None and s.directory.ldap.mail_attribute == "mail"
    s = load(write(tmp_path, ldap + 'mail_attribute = "proxyMail"\n'))
    assert s.directory.ldap is not None and s.directory.ldap.mail_attribute == "proxyMail"


# -- warnings: what works but is probably a mistake -------------------------------------------

LDAP_DIRECTORY = """\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[directory]
type = "ldap"
urls = [{urls}]
user_base = "ou=people,dc=example,dc=org"
{extra}
"""


def test_plain_ldap_to_another_host_is_warned(tmp_path: Path) -> None:
    text = LDAP_DIRECTORY.format(
        urls='"ldap://127.0.0.1:389", "ldap://localhost", "ldaps://dc1.example.org", '
             '"ldap://dc2.example.org"', extra="")
    assert load(write(tmp_path, text)).warnings == (
        "directory.urls: ldap://dc2.example.org is plain LDAP without StartTLS to a "
        "non-loopback host: the service account's and users' passwords cross the network in "
        "clear; use ldaps:// or set start_tls = true",)
    text = LDAP_DIRECTORY.format(urls='"ldap://dc2.example.org"', extra="start_tls = true")
    assert load(write(tmp_path, text)).warnings == ()


def test_plain_ldap_upstream_is_warned(tmp_path: Path) -> None:
    warnings = load(write(tmp_path, BASE + '[ldap]\nupstream = "ldap://10.1.2.3:389"\n')).warnings
    assert [w.partition(":")[0] for w in warnings] == ["ldap.upstream"]


def test_a_cidr_with_host_bits_is_warned(tmp_path: Path) -> None:
    s = load(write(tmp_path, BASE + RADIUS.replace('"127.0.0.0/8"', '"10.0.0.1/24"')))
    assert s.warnings == (
        "radius.clients[0].address: 10.0.0.1/24 has host bits set: it means the whole "
        "network 10.0.0.0/24; write 10.0.0.0/24 (or 10.0.0.1 for that one host)",)
    assert s.radius is not None and str(s.radius.clients[0].networks[0]) == "10.0.0.0/24"
    for fine in ('"10.0.0.0/24"', '"10.0.0.1"', '"10.0.0.1/32"', '"fd00::/64"'):
        assert load(write(tmp_path, BASE + RADIUS.replace('"127.0.0.0/8"', fine))).warnings == ()


def test_secret_files_readable_by_others_are_warned(tmp_path: Path) -> None:
    secret = tmp_path / "radius.secret"
    secret.write_text("a-long-enough-radius-secret\n")
    secret.chmod(0o640)
    text = BASE + RADIUS.replace('secret = "a-long-enough-radius-secret"',
                                 'secret_file = "radius.secret"')
    assert load(write(tmp_path, text)).warnings == (
        f"radius.clients[0].secret_file: {secret} is readable by group (mode 640): it holds a "
        "secret; chmod 600 it",)
    secret.chmod(0o600)
    assert load(write(tmp_path, text)).warnings == ()


def test_a_key_file_readable_by_others_is_warned(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    key = tmp_path / "var" / "secret.key"
    key.write_text("current = 1\n")
    key.chmod(0o604)
    [warning] = load(write(tmp_path, BASE)).warnings
    assert warning.startswith(f"state.key_file: {key} is readable by others (mode 604)")


@pytest.mark.parametrize(("text", "line"), [
    (BASE.replace("[directory]", "[directory]\nusers_fil = 'x'"),
     "directory.users_fil: unknown key (did you mean users_file?)"),
    (BASE + "[htp]\n", "htp: unknown key (did you mean http?)"),
    (BASE + "[policy]\nlockout_second = 1\n",
     "policy.lockout_second: unknown key (did you mean lockout_seconds?)"),
    (BASE + "[policy]\nzzz = 1\n", "policy.zzz: unknown key"),
])
def test_a_mistyped_key_gets_a_suggestion(tmp_path: Path, text: str, line: str) -> None:
    assert problems(tmp_path, text) == [line]


# -- what start-up refuses, check-config refuses (load_checked) -------------------------------


def checked_problems(tmp_path: Path, text: str) -> list[str]:
    from proxy.config import load_checked

    with pytest.raises(ConfigError) as e:
        load_checked(write(tmp_path, text))
    return e.value.problems


def test_reply_attributes_are_checked_against_the_dictionary(tmp_path: Path) -> None:
    text = BASE + RADIUS + """
[[radius.reply]]
group = "vpn"
attributes = { Bogus-Attribute = "x", Session-Timeout = "soon", State = "x" }
"""
    load(write(tmp_path, text))  # the parse alone accepts it
    found = checked_problems(tmp_path, text)
    assert found[0] == "radius.reply[0].attributes.Bogus-Attribute: not in the RADIUS dictionary"
    assert found[1] == ("radius.reply[0].attributes.Session-Timeout: 'soon': Can not encode "
                        "non-integer as integer")
    assert found[2] == "radius.reply[0].attributes.State: written by the proxy itself"
    assert len(found) == 3


def test_tls_files_are_loaded_as_serve_loads_them(tmp_path: Path) -> None:
    (tmp_path / "portal.crt").write_text("not a certificate")
    key = tmp_path / "portal.key"
    key.write_text("not a key")
    key.chmod(0o600)
    text = BASE + ('[portal]\nlisten = "127.0.0.1:8443"\ncert_file = "portal.crt"\n'
                   'key_file = "portal.key"\n')
    assert checked_problems(tmp_path, text) == [
        f"portal.cert_file: {tmp_path / 'portal.crt'}: no PEM certificate"]


def test_a_ca_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("nothing here\n")
    text = LDAP_DIRECTORY.format(urls='"ldaps://127.0.0.1"', extra='ca_file = "ca.pem"')
    assert checked_problems(tmp_path, text) == [
        f"directory.ca_file: {tmp_path / 'ca.pem'}: no PEM certificate"]


def test_a_broken_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    key = tmp_path / "var" / "secret.key"
    key.write_text("garbage\n")
    key.chmod(0o600)
    [line] = checked_problems(tmp_path, BASE)
    assert line.startswith(f"state.key_file: {key}: line 1")


def test_a_good_file_passes_the_startup_checks(tmp_path: Path) -> None:
    from proxy.config import load_checked, startup_problems

    text = (BASE + RADIUS
            + '\n[[radius.reply]]\ngroup = "vpn"\nattributes = { Session-Timeout = 3600 }\n')
    assert startup_problems(load_checked(write(tmp_path, text))) == []


def test_an_operators_dictionary_brings_vendor_attributes(tmp_path: Path) -> None:
    """[radius] dictionary: the shipped one $INCLUDEd, plus a vendor of the operator's."""
    from proxy.config import load_checked
    from proxy.radius.packet import SHIPPED_DICTIONARY, load_dictionary

    (tmp_path / "dictionary").write_text(
        f"$INCLUDE {SHIPPED_DICTIONARY}\n"
        "VENDOR\tExampleNet\t64999\n"
        "BEGIN-VENDOR\tExampleNet\n"
        "ATTRIBUTE\tExampleNet-Role\t1\tstring\n"
        "END-VENDOR\tExampleNet\n")
    rule = '\n[[radius.reply]]\ngroup = "vpn"\nattributes = { ExampleNet-Role = "admin" }\n'
    shipped = BASE + RADIUS + rule
    assert checked_problems(tmp_path, shipped) == [
        "radius.reply[0].attributes.ExampleNet-Role: not in the RADIUS dictionary"]
    own = shipped.replace("[radius]\n", '[radius]\ndictionary = "dictionary"\n')
    s = load_checked(write(tmp_path, own))
    assert s.radius is not None and s.radius.dictionary == tmp_path / "dictionary"
    assert load_dictionary(str(s.radius.dictionary))["ExampleNet-Role"].vendor == "ExampleNet"


def test_a_dictionary_that_renumbers_the_proxys_attributes_is_refused(tmp_path: Path) -> None:
    """The front-end reads State, User-Password, Message-Authenticator... by their RFC
    numbers: a dictionary that numbers them otherwise would make reply rules lie."""
    (tmp_path / "dictionary").write_text("ATTRIBUTE\tState\t99\toctets\n")
    text = (BASE + RADIUS).replace("[radius]\n", '[radius]\ndictionary = "dictionary"\n')
    [line] = checked_problems(tmp_path, text)
    assert line.startswith("radius.dictionary: cannot load the RADIUS dictionary: ValueError: "
                           "RADIUS dictionary: State is 99, RFC says 24")


def test_a_missing_dictionary_is_refused(tmp_path: Path) -> None:
    text = (BASE + RADIUS).replace("[radius]\n", '[radius]\ndictionary = "nowhere"\n')
    [line] = checked_problems(tmp_path, text)
    assert line.startswith("radius.dictionary: cannot load the RADIUS dictionary:")


# -- [service] cpu_affinity ----------------------------------------------------------------


def test_cpu_affinity_takes_cpus_this_process_may_run_on(tmp_path: Path) -> None:
    import os

    cpu = min(os.sched_getaffinity(0))
    s = load(write(tmp_path, BASE + f"\n[service]\ncpu_affinity = [{cpu}, {cpu}]\n"))
    assert s.service.cpu_affinity == (cpu,)
    assert load(write(tmp_path, BASE)).service.cpu_affinity == ()


@pytest.mark.parametrize("value", ["[-1]", '["0"]', "[true]", "0", "[100000]"])
def test_cpu_affinity_refuses_what_could_not_be_applied(tmp_path: Path, value: str) -> None:
    found = problems(tmp_path, BASE + f"\n[service]\ncpu_affinity = {value}\n")
    assert len(found) == 1 and "cpu_affinity" in found[0]


def test_pin_threads_moves_running_threads_and_later_ones_inherit() -> None:
    import os
    import threading

    from proxy.service import pin_threads

    before = os.sched_getaffinity(0)
    cpu = max(before)
    stop = threading.Event()
    running = threading.Thread(target=stop.wait)
    running.start()
    try:
        pin_threads((cpu,))
        assert running.native_id is not None
        assert os.sched_getaffinity(running.native_id) == {cpu}
        seen: list[set[int]] = []
        later = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen == [{cpu}]
    finally:
        stop.set()
        running.join()
        pin_threads(tuple(before))


def test_cpu_affinity_that_cannot_be_applied_is_a_warning_and_serve_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Under the shipped systemd unit the seccomp filter answers sched_setaffinity
    with EPERM: serve says how to pin there and runs unpinned, it does not crash."""
    import errno

    from proxy import service

    def refused(cpus: tuple[int, ...]) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    class Stop(Exception):
        pass

    def no_service(*args: object) -> None:
        raise Stop

    monkeypatch.setattr(service, "pin_threads", refused)
    monkeypatch.setattr(service, "Service", no_service)
    monkeypatch.setattr(service, "setup_logging", lambda *a: None)
    import os

    cpu = min(os.sched_getaffinity(0))
    settings = load(write(tmp_path, BASE + f"\n[service]\ncpu_affinity = [{cpu}]\n"))
    with caplog.at_level("WARNING"), pytest.raises(Stop):
        service.run(settings)
    (line,) = [r.getMessage() for r in caplog.records if "cpu_affinity" in r.getMessage()]
    assert "Operation not permitted" in line and "CPUAffinity=" in line
