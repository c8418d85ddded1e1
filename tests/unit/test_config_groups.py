"""The group keys of the config: [policy] require_groups, [directory] group_filter
and group_cache_seconds."""

from __future__ import annotations

from pathlib import Path

from backends.ldap_common import LdapOptions
from proxy.config import load
from tests.unit.test_config import BASE, RADIUS, problems, write

LDAP = """\
[state]
url = "sqlite:///state.db"
[directory]
type = "ldap"
urls = ["ldap://127.0.0.1:389"]
user_base = "ou=people,dc=example,dc=org"
"""


def test_defaults(tmp_path: Path) -> None:
    settings = load(write(tmp_path, LDAP))
    assert settings.policy.require_groups == ()
    assert settings.directory.ldap is not None
    assert settings.directory.ldap.group_filter == "(member={dn})" == LdapOptions().group_filter
    assert settings.directory.ldap.group_cache_seconds == 60.0


def test_require_groups_and_the_group_keys(tmp_path: Path) -> None:
    settings = load(write(tmp_path, LDAP + """\
group_base = "ou=groups,dc=example,dc=org"
group_filter = "(memberUid={username})"
group_cache_seconds = 0
[policy]
require_groups = ["vpn-users", "cn=Admins,ou=groups,dc=example,dc=org"]
enrollment_days = 3
"""))
    assert settings.policy.require_groups == ("vpn-users", "cn=Admins,ou=groups,dc=example,dc=org")
    assert settings.directory.ldap is not None
    assert settings.directory.ldap.group_filter == "(memberUid={username})"
    assert settings.directory.ldap.group_cache_seconds == 0
    assert settings.warnings == ()


def test_bad_values_name_their_key(tmp_path: Path) -> None:
    found = problems(tmp_path, LDAP + """\
group_filter = "(member=x)"
group_cache_seconds = -1
[policy]
require_groups = ["vpn", ""]
""")
    assert any(p.startswith("directory.group_filter: must contain {dn} or {username}")
               for p in found), found
    assert any(p.startswith("directory.group_cache_seconds:") for p in found), found
    assert "policy.require_groups: a group name cannot be empty" in found
    found = problems(tmp_path, BASE + "[policy]\nrequire_groups = [1]\n")
    assert any(p.startswith("policy.require_groups:") for p in found), found


def test_a_directory_that_reads_no_groups_is_a_warning(tmp_path: Path) -> None:
    settings = load(write(tmp_path, LDAP + "use_memberof = false\n" + RADIUS + """
[[radius.reply]]
group = "admins"
attributes = { Class = "admins" }
[policy]
require_groups = ["vpn-users"]
"""))
    assert [w.partition(":")[0] for w in settings.warnings] == ["policy.require_groups",
                                                                "radius.reply"]


def test_local_users_file_groups_need_nothing_more(tmp_path: Path) -> None:
    settings = load(write(tmp_path, BASE + "[policy]\nrequire_groups = [\"vpn\"]\n"))
    assert settings.policy.require_groups == ("vpn",) and settings.warnings == ()
