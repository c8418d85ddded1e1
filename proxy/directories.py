"""Config → directory objects. Kept light (no Twisted) so the admin CLI starts fast."""

from __future__ import annotations

from typing import Any

from backends.base import Directory
from policy.usernames import UsernameRules
from proxy.config import DirectorySettings


def username_rules(d: DirectorySettings) -> UsernameRules:
    return UsernameRules(d.lowercase_usernames, d.strip_domain, d.strip_realm)


def make_directory(d: DirectorySettings) -> Directory:
    if d.type == "local":
        from backends.local import LocalDirectory

        assert d.users_file is not None
        return LocalDirectory(d.users_file)
    from backends.ldap import LdapDirectory

    return LdapDirectory(ldap_options(d))


def ldap_options(d: DirectorySettings) -> Any:
    """The LDAP client's options, as the config parsed them."""
    assert d.ldap is not None, "directory.type is not ldap"
    return d.ldap


__all__ = ["ldap_options", "make_directory", "username_rules"]
