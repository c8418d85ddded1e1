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
    from backends.ldap_common import LdapOptions

    return LdapOptions(
        urls=list(d.urls), bind_dn=d.bind_dn, bind_password=d.bind_password,
        user_base=d.user_base, user_filter=d.user_filter,
        username_attribute=d.username_attribute, group_base=d.group_base,
        group_filter=d.group_filter, use_memberof=d.use_memberof, start_tls=d.start_tls,
        ca_file=str(d.ca_file) if d.ca_file else "", tls_verify=d.tls_verify,
        connect_timeout=d.connect_timeout, timeout=d.timeout,
        dn_cache_seconds=float(d.dn_cache_seconds),
    )


__all__ = ["ldap_options", "make_directory", "username_rules"]
