"""RADIUS clients (NAS) by source address, and what each one gets.

A datagram's source address picks its client; the most specific prefix
wins, so ``10.0.0.0/8`` and ``10.1.2.3/32`` may both be configured and the
``/32`` one decides for 10.1.2.3.  IPv4-mapped IPv6 sources (a dual-stack
``[::]`` listener) match IPv4 networks.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from policy.decision import MfaMode, SplitMode

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LOOKUP_CACHE_SIZE = 4096


class EnrollmentNotice(enum.StrEnum):
    """How a user in an enrollment period is told the days left."""

    REPLY_MESSAGE = "reply-message"  # a Reply-Message on the Access-Accept
    CHALLENGE = "challenge"  # an Access-Challenge first: many VPN clients only show those
    NONE = "none"


Attributes = Mapping[str, Any] | Sequence[tuple[str, Any]]


class ReplyRuleLike(Protocol):
    """Anything with a group and its attributes (``proxy.config.ReplyRule`` too)."""

    @property
    def group(self) -> str: ...

    @property
    def attributes(self) -> Attributes: ...


@dataclass(frozen=True)
class ReplyRule:
    """Attributes sent on an Access-Accept to members of ``group``.

    ``attributes`` maps dictionary names to values (a list for several
    values); ``[[radius.reply]] group = "admins" attributes = {...}`` in the
    config file becomes one rule.
    """

    group: str
    attributes: Attributes


def rule_pairs(rule: ReplyRuleLike) -> list[tuple[str, Any]]:
    if isinstance(rule.attributes, Mapping):
        return list(rule.attributes.items())
    return list(rule.attributes)


@dataclass(frozen=True)
class RadiusClientConfig:
    """One ``[[radius.clients]]`` entry, with the ``[radius]`` defaults filled in.

    Strings are accepted for the enum fields and addresses/CIDRs for the
    networks, so a config object maps over field by field.
    """

    name: str
    networks: tuple[IPNetwork, ...]
    nas_secret: bytes
    mode: SplitMode = SplitMode.AUTO
    mfa: MfaMode = MfaMode.ENROLLED
    separator: str = ","
    require_message_authenticator: bool = True
    repeat_window_seconds: int = 0
    enrollment_notice: EnrollmentNotice = EnrollmentNotice.REPLY_MESSAGE
    nas_timeout: float | None = None  # seconds the NAS waits; slower decisions are logged
    reply_rules: tuple[ReplyRuleLike, ...] = ()  # after the global [[radius.reply]]

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "mode", SplitMode(self.mode))
        set_(self, "mfa", MfaMode(self.mfa))
        set_(self, "enrollment_notice", EnrollmentNotice(self.enrollment_notice))
        set_(self, "networks", tuple(ipaddress.ip_network(n, strict=False)
                                     for n in self.networks))
        set_(self, "reply_rules", tuple(self.reply_rules))
        if isinstance(self.nas_secret, str):
            set_(self, "nas_secret", self.nas_secret.encode())
        if not self.nas_secret:
            raise ValueError(f"RADIUS client {self.name!r}: empty shared secret")
        if not self.networks:
            raise ValueError(f"RADIUS client {self.name!r}: no address")


def normalize_address(host: str) -> IPAddress | None:
    """The address a datagram came from, IPv4-mapped IPv6 unwrapped; None if unparsable."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientTable:
    """Clients by source address; the most specific prefix wins."""

    def __init__(self, clients: Iterable[RadiusClientConfig]) -> None:
        self._clients = tuple(clients)
        entries = [(net, c) for c in self._clients for net in c.networks]
        _refuse_duplicates(self._clients, entries)
        # Longest prefix first: the first network that holds the address wins.
        entries.sort(key=lambda e: e[0].prefixlen, reverse=True)
        self._v4 = [(n, c) for n, c in entries if n.version == 4]
        self._v6 = [(n, c) for n, c in entries if n.version == 6]
        self._cache: dict[str, RadiusClientConfig | None] = {}

    def lookup(self, host: str) -> RadiusClientConfig | None:
        try:
            return self._cache[host]
        except KeyError:
            pass
        client = self._find(normalize_address(host))
        if len(self._cache) >= _LOOKUP_CACHE_SIZE:
            self._cache.clear()  # bounded: a flood of sources only costs re-lookups
        self._cache[host] = client
        return client

    def _find(self, address: IPAddress | None) -> RadiusClientConfig | None:
        if address is None:
            return None
        for network, client in self._v4 if address.version == 4 else self._v6:
            if address in network:
                return client
        return None

    def __iter__(self) -> Iterator[RadiusClientConfig]:
        return iter(self._clients)

    def __len__(self) -> int:
        return len(self._clients)


def _refuse_duplicates(clients: Sequence[RadiusClientConfig],
                       entries: list[tuple[IPNetwork, RadiusClientConfig]]) -> None:
    names = [c.name for c in clients]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"RADIUS client name {name!r} is used twice")
    owners: dict[IPNetwork, str] = {}
    for network, client in entries:
        other = owners.setdefault(network, client.name)
        if other != client.name:
            raise ValueError(f"RADIUS clients {other!r} and {client.name!r} both claim "
                             f"{network}: which secret applies would be a guess")
