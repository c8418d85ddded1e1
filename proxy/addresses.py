"""Listen addresses: ``127.0.0.1:1812``, ``[::1]:3389``. One parser for every listener."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: str, any_port: bool = False) -> Address:
    """'127.0.0.1:1812', '[::1]:1812' → Address. Hostnames are refused: a listener
    binds an address, and we want no DNS surprises at start. ``any_port``: port 0
    (the system picks one; tests) is allowed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT (IPv6 as [::1]:PORT), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # "2001:db8::1:389": is 389 the port or part of the address?
        raise ValueError(f"an IPv6 address needs brackets, as [::1]:PORT, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} in {value!r}") from None
    if not (0 if any_port else 1) <= int(port) < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return Address(host, int(port))
