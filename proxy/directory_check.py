"""`check-config --connect`: each `[directory] urls` entry tried the way serve uses it.

Per URL: can it be reached (and how long the connection took), which TLS
(ldaps://, StartTLS or none) and whether the certificate was verified, whether
the service account binds; then, with a probe user, whether the user filter
finds exactly one entry (its DN), and with ``group_base`` how long the group
search for that entry takes.

The group search is compared with the user look-up, an equality search that
every directory indexes (``uid``, ``sAMAccountName``): when it takes much
longer, the group filter's attributes (``member``, ``uniqueMember``) are
probably not indexed, and every sign-in pays that search. Sync ldap3, like the
other admin commands (serve uses the Twisted client): this runs once, from a
terminal.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from backends.ldap_common import LdapOptions, group_search_filter, user_search_filter

# The group search "looks unindexed" when it takes this many times the user look-up,
# and at least SLOW_MS (below that nobody waits for it, indexed or not).
UNINDEXED_RATIO = 10.0
SLOW_MS = 50.0


@dataclass
class UrlReport:
    """What was learned about one URL; ``ok``: reachable and the service bind worked."""

    url: str
    ok: bool = False
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def unindexed_warning(group_ms: float, user_ms: float, group_base: str) -> str | None:
    """The warning for a group search that looks unindexed (None when it does not)."""
    baseline = max(user_ms, 1.0)
    if group_ms < SLOW_MS or group_ms < UNINDEXED_RATIO * baseline:
        return None
    return (f"the group search under {group_base} took {group_ms:.0f} ms, "
            f"{group_ms / baseline:.0f}× the user look-up ({user_ms:.1f} ms, an indexed "
            "equality search): the group filter's attributes are probably not indexed, and "
            "every sign-in waits for it (OpenLDAP: `index member,uniqueMember eq` on the "
            "database; Active Directory indexes member)")


def tls_description(url: str, options: LdapOptions) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme != "ldaps" and not options.start_tls:
        return "none (plain LDAP)"
    how = "ldaps" if scheme == "ldaps" else "StartTLS"
    if not options.tls_verify:
        return f"{how}, certificate NOT verified (tls_verify = false)"
    trust = f"CA file {options.ca_file}" if options.ca_file else "the system's trusted CAs"
    return f"{how}, certificate and name verified against {trust}"


def check_url(url: str, options: LdapOptions, lookup_name: str | None) -> UrlReport:
    """Connect, (StartTLS,) bind the service account, and with ``lookup_name`` run
    the user filter and the group search: one URL, as serve would use it."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    report = UrlReport(url)
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED if options.tls_verify else ssl.CERT_NONE,
                    ca_certs_file=options.ca_file or None, version=ssl.PROTOCOL_TLS_CLIENT)
    server = ldap3.Server(url, connect_timeout=options.connect_timeout, get_info=ldap3.NONE,
                          tls=tls)
    conn = ldap3.Connection(server, receive_timeout=max(1, int(options.timeout + 0.999)),
                            raise_exceptions=False, auto_referrals=False, read_only=True)
    started = time.monotonic()
    try:
        conn.open(read_server_info=False)
        if options.start_tls and urlsplit(url).scheme.lower() != "ldaps" and not conn.start_tls(
                read_server_info=False):
            raise _Failed(f"StartTLS refused: {_result(conn)}")
        connected = _ms(started)
        report.lines.append(f"reachable in {connected:.1f} ms; TLS: "
                            f"{tls_description(url, options)}")
        if not _service_bind(conn, options, report):
            return report
        report.ok = True
        if lookup_name is not None:
            _user_and_groups(conn, options, lookup_name, report)
    except _Failed as e:
        report.lines.append(str(e))
    except (LDAPException, OSError) as e:
        report.lines.append(f"unreachable after {_ms(started):.0f} ms: {_plain(e)}")
    finally:
        with contextlib.suppress(LDAPException, OSError):
            conn.unbind()
    return report


class _Failed(Exception):
    pass


def _service_bind(conn: Any, options: LdapOptions, report: UrlReport) -> bool:
    import ldap3

    if not options.bind_dn:
        report.lines.append("no bind_dn: look-ups are anonymous")
        return True
    conn.user, conn.password, conn.authentication = (options.bind_dn, options.bind_password,
                                                     ldap3.SIMPLE)
    started = time.monotonic()
    if not conn.bind(read_server_info=False):
        report.lines.append(f"the service account {options.bind_dn} cannot bind: "
                            f"{_result(conn)}")
        return False
    report.lines.append(f"the service account {options.bind_dn} binds in "
                        f"{_ms(started):.1f} ms")
    return True


def _user_and_groups(conn: Any, options: LdapOptions, name: str, report: UrlReport) -> None:
    import ldap3

    started = time.monotonic()
    conn.search(options.user_base, user_search_filter(options.user_filter, name),
                ldap3.SUBTREE, attributes=[options.username_attribute], size_limit=2)
    user_ms = _ms(started)
    entries = [e for e in conn.response or () if e.get("type") == "searchResEntry"]
    if not entries:
        failed = "" if _code(conn) in (0, 32) else f" ({_result(conn)})"
        report.lines.append(f"user {name!r}: not found under {options.user_base}{failed} "
                            f"({user_ms:.1f} ms)")
        return
    if len(entries) > 1:
        report.lines.append(f"user {name!r}: the user filter matches several entries "
                            f"({user_ms:.1f} ms): refused at sign-in")
        report.warnings.append(f"user_filter matches several entries for {name!r}")
        return
    dn = str(entries[0]["dn"])
    report.lines.append(f"user {name!r}: found {dn} ({user_ms:.1f} ms)")
    if not options.group_base:
        return
    started = time.monotonic()
    conn.search(options.group_base, group_search_filter(options.group_filter, dn),
                ldap3.SUBTREE, attributes=[options.group_name_attribute])
    group_ms = _ms(started)
    groups = [e for e in conn.response or () if e.get("type") == "searchResEntry"]
    report.lines.append(f"groups of {name!r}: {len(groups)} under {options.group_base} "
                        f"({group_ms:.1f} ms)")
    warning = unindexed_warning(group_ms, user_ms, options.group_base)
    if warning:
        report.warnings.append(warning)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


def _code(conn: Any) -> int | None:
    result = conn.result or {}
    code = result.get("result")
    return int(code) if code is not None else None


def _result(conn: Any) -> str:
    result = conn.result or {}
    text = f"result {result.get('result')} {result.get('description', '')}".strip()
    message = result.get("message")
    return f"{text}: {message}" if message else text


def _plain(error: BaseException) -> str:
    """ldap3's socket errors in a person's words."""
    text = str(error)
    lowered = text.lower()
    for needle, words in (("refused", "connection refused"), ("timed out", "timed out"),
                          ("certificate verify failed", "TLS certificate verification failed"),
                          ("wrong version number", "TLS handshake failed (not a TLS port?)"),
                          ("name or service not known", "host name not found")):
        if needle in lowered:
            return words if needle != "certificate verify failed" else (
                f"{words}: {_after(text, 'certificate verify failed')}")
    return text or type(error).__name__


def _after(text: str, needle: str) -> str:
    i = text.lower().find(needle)
    rest = text[i + len(needle):].strip(" :()'\"],")
    return rest.split("'")[0].split(")")[0].strip() or needle
