"""Settings of the LDAP front-end: the ``[ldap]`` section, already validated.

The TOML loader (``proxy/config.py``) maps the section onto
:class:`LdapFrontendConfig`; this module only parses the two string forms
the section carries (listen addresses and the upstream URL) and checks the
values the front-end cannot work without.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from policy.decision import MfaMode
from proxy.addresses import parse_address


@dataclass(frozen=True)
class BindCacheRule:
    """A bind-cache window for binds whose DN is ``dn`` or ends with it.

    Applications that re-bind on every request (many web apps, PAM stacks
    without connection reuse) can get a longer window than the default; the
    longest matching suffix wins.
    """

    dn: str
    seconds: int


@dataclass(frozen=True)
class LdapFrontendConfig:
    listen: tuple[str, ...] = ("127.0.0.1:3389",)  # "host:port", IPv6 as "[::1]:3389"
    ldaps_listen: tuple[str, ...] = ()  # TLS from the first byte; needs cert_file/key_file
    cert_file: str = ""  # PEM, leaf first then any intermediates; enables StartTLS on `listen`
    key_file: str = ""
    upstream: str = "ldap://127.0.0.1:389"  # ldap:// or ldaps://
    upstream_start_tls: bool = False  # StartTLS on an ldap:// upstream before anything else
    ca_file: str = ""  # CA bundle for the upstream's certificate ("" = system trust)
    tls_verify: bool = True  # verify the upstream's certificate and name
    exempt: tuple[str, ...] = ()  # DNs or DN suffixes that bind with the password only
    mfa: MfaMode = MfaMode.ENROLLED
    separator: str = ","  # between password and code in a simple bind's password
    # Accept a repeat of the same successful credential from the same address
    # within this many seconds without a new code (0 = off): the core's repeat
    # window, so each such bind is still a decision with its audit row, and the
    # password is still checked. Trade-off: a stolen password+code is
    # replayable for the window from the same address.
    bind_cache_seconds: int = 0
    bind_cache_rules: tuple[BindCacheRule, ...] = ()
    allow_anonymous: bool = False
    # Refuse operations (50) before a successful bind and after a failed one.
    # None: on unless allow_anonymous (then an application may search without binding).
    require_bind: bool | None = None
    # Relay SASL binds to the directory as they are. They carry no code, so this
    # BYPASSES MFA for whatever identity the mechanism asserts (PLAIN's authcid,
    # EXTERNAL's certificate, ...); off, every SASL bind is refused with 7.
    sasl_passthrough: bool = False
    # bytes, per LDAPMessage from a client: a bind or a search is a few hundred
    # bytes; a large add or modify (a photo, a certificate) may need more.
    max_message_size: int = 256 * 1024
    max_connections: int = 1000
    max_connections_per_source: int = 64  # open connections from one client address
    # Bytes of partial messages held from clients across all connections; a
    # connection whose partial message would push past it is dropped.
    max_buffered_bytes: int = 64 * 1024 * 1024
    idle_timeout: float = 600.0  # seconds without traffic (0 = never)
    # Seconds a connection may stay open before its first successful bind (0 = no
    # limit): idle or trickling unauthenticated sockets cost an upstream connection each.
    unbound_timeout: float = 10.0
    # When set, an MFA bind's DN must lie under it (a user entry): a non-exempt DN
    # elsewhere (the rootdn, an entry named like a user in another subtree) is
    # refused with 49 instead of passing with a password as an unknown user.
    # Bind names that are not DNs (AD's user@realm, DOMAIN\user) are not affected.
    user_base: str = ""
    client_name: str = "ldap"  # AuthRequest.client: a bounded metric label
    connect_timeout: float = 10.0  # seconds to reach (and TLS-handshake) the upstream
    # The longest a decision (directory bind + policy) may take before the
    # bind is answered 52; guards a client against a hung upstream.
    bind_timeout: float = 30.0
    max_response_size: int = 64 * 1024 * 1024  # bytes, per LDAPMessage from the upstream

    def __post_init__(self) -> None:
        # Accept the TOML spellings the loader may pass through unchanged.
        object.__setattr__(self, "mfa", MfaMode(self.mfa))
        for key in ("listen", "ldaps_listen", "exempt", "bind_cache_rules"):
            object.__setattr__(self, key, tuple(getattr(self, key)))

    @property
    def requires_bind(self) -> bool:
        """require_bind as set, else on unless anonymous binds are allowed."""
        return self.require_bind if self.require_bind is not None else not self.allow_anonymous

    def problems(self) -> list[str]:
        """One line per invalid value, naming the key (empty when valid)."""
        found: list[str] = []
        for key, addresses in (("listen", self.listen), ("ldaps_listen", self.ldaps_listen)):
            for address in addresses:
                try:
                    parse_listen(address)
                except ValueError as error:
                    found.append(f"ldap.{key}: {error}")
        if self.ldaps_listen and not (self.cert_file and self.key_file):
            found.append("ldap.ldaps_listen: needs ldap.cert_file and ldap.key_file")
        if bool(self.cert_file) != bool(self.key_file):
            found.append("ldap.cert_file: cert_file and key_file go together")
        try:
            upstream = parse_upstream(self.upstream)
            if upstream.tls and self.upstream_start_tls:
                found.append("ldap.upstream_start_tls: not with an ldaps:// upstream")
        except ValueError as error:
            found.append(f"ldap.upstream: {error}")
        found += self._number_problems()
        return found

    def _number_problems(self) -> list[str]:
        found = []
        if self.bind_cache_seconds < 0:
            found.append("ldap.bind_cache_seconds: must be 0 or more")
        found += [
            f"ldap.bind_cache_rules: {rule.dn!r}: seconds must be 0 or more"
            for rule in self.bind_cache_rules
            if rule.seconds < 0
        ]
        if self.max_message_size < 64:
            found.append("ldap.max_message_size: must be at least 64 bytes")
        if self.max_connections < 1:
            found.append("ldap.max_connections: must be at least 1")
        if self.max_connections_per_source < 1:
            found.append("ldap.max_connections_per_source: must be at least 1")
        if self.max_buffered_bytes < self.max_message_size:
            found.append("ldap.max_buffered_bytes: must be at least ldap.max_message_size")
        for key in ("idle_timeout", "unbound_timeout", "connect_timeout", "bind_timeout"):
            if getattr(self, key) < 0:
                found.append(f"ldap.{key}: must be 0 or more")
        return found


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    tls: bool  # ldaps://


def parse_listen(address: object) -> tuple[str, int]:
    """``"127.0.0.1:3389"`` or ``"[::1]:3389"`` → (host, port), as every listener
    address is read (proxy/addresses.py); port 0 lets the system pick (tests)."""
    parsed = parse_address(str(address), any_port=True)
    return parsed.host, parsed.port


def parse_upstream(url: str) -> Upstream:
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps"):
        raise ValueError(f"{url!r}: scheme must be ldap:// or ldaps://")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    tls = parts.scheme == "ldaps"
    return Upstream(parts.hostname, port or (636 if tls else 389), tls)
