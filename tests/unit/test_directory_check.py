"""`check-config --connect`: the words it uses, apart from the network (the network
part is tests/integration/test_check_connect.py, against a real slapd)."""

from __future__ import annotations

import pytest

from backends.ldap_common import LdapOptions
from proxy.directory_check import tls_description, unindexed_warning


@pytest.mark.parametrize(("group_ms", "user_ms", "warned"), [
    (1.5, 1.2, False),      # both fast: indexed
    (40.0, 0.5, False),     # slower, but nobody waits 40 ms
    (300.0, 40.0, False),   # a slow directory, not a missing index
    (300.0, 2.0, True),     # 150x the indexed equality search
    (80.0, 0.2, True),      # the baseline is at least 1 ms
])
def test_a_group_search_looks_unindexed_when_far_slower_than_the_user_look_up(
        group_ms: float, user_ms: float, warned: bool) -> None:
    warning = unindexed_warning(group_ms, user_ms, "ou=groups,dc=example,dc=org")
    assert (warning is not None) is warned
    if warning:
        assert warning.startswith(f"the group search under ou=groups,dc=example,dc=org took "
                                  f"{group_ms:.0f} ms")
        assert "index member,uniqueMember eq" in warning


def test_tls_is_described_as_it_is_used() -> None:
    plain = LdapOptions(user_base="dc=x")
    assert tls_description("ldap://h", plain) == "none (plain LDAP)"
    verified = LdapOptions(user_base="dc=x", start_tls=True, ca_file="/etc/ca.pem")
    assert tls_description("ldap://h", verified) == (
        "StartTLS, certificate and name verified against CA file /etc/ca.pem")
    assert tls_description("ldaps://h", LdapOptions(user_base="dc=x")) == (
        "ldaps, certificate and name verified against the system's trusted CAs")
    assert tls_description("ldaps://h", LdapOptions(user_base="dc=x", tls_verify=False)) == (
        "ldaps, certificate NOT verified (tls_verify = false)")
