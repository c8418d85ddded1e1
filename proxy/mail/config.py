"""``[mail]``: where and how mail is sent, already validated (proxy/config.py
reads the TOML into :class:`MailConfig`; :meth:`MailConfig.problems` holds
the checks the sender relies on, which check-config runs too)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path

from policy.mail import RetryPolicy, Template, valid_address

SECURITY = ("none", "starttls", "tls")
DEFAULT_PORTS = {"none": 25, "starttls": 587, "tls": 465}


@dataclass(frozen=True)
class MailConfig:
    host: str
    port: int
    security: str = "starttls"  # "none" | "starttls" | "tls" (TLS from the first byte)
    username: str = ""  # AUTH when set
    password: str = ""
    from_header: str = ""  # "MFA <mfa@example.org>"
    reminder_hours: int = 24  # 0 = no reminders
    ca_file: str = ""  # CA bundle for the server's certificate ("" = the system's)
    tls_verify: bool = True  # verify the server's certificate and name
    timeout_seconds: float = 30.0  # per SMTP step
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    claim_seconds: int = 300  # how long a sender holds a claimed mail
    poll_seconds: float = 15.0  # how often the sender looks for due mail and reminders
    batch: int = 20  # mails claimed at once
    templates: Mapping[str, Template] = field(default_factory=dict)
    templates_dir: Path | None = None  # the operator's, over the packaged ones

    @property
    def envelope_from(self) -> str:
        return parseaddr(self.from_header)[1]

    @property
    def server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def problems(self) -> list[str]:
        """One line per unusable value, naming its key."""
        found = []
        if self.security not in SECURITY:
            found.append(f"security: must be one of {', '.join(map(repr, SECURITY))}, "
                         f"got {self.security!r}")
        if not self.from_header:
            found.append("from: missing: the sender, as \"MFA <mfa@example.org>\"")
        elif not valid_address(self.envelope_from) or any(
                ord(c) < 0x20 for c in self.from_header):
            found.append(f"from: not a mail address: {self.from_header!r}")
        if self.username and not self.password:
            found.append("password_file: missing: AUTH with username needs a password")
        if self.claim_seconds < 3 * self.timeout_seconds:
            found.append(f"claim_seconds: must be at least 3 × timeout_seconds "
                         f"({3 * self.timeout_seconds:g}), got {self.claim_seconds}: a send "
                         "still under way must not be taken over by another instance")
        return found

    def warnings(self) -> list[str]:
        found = []
        if self.username and self.security == "none" and not _loopback(self.host):
            found.append("security: \"none\" with AUTH: the SMTP password crosses the "
                         "network in clear; use \"starttls\" or \"tls\"")
        if not self.tls_verify and self.security != "none":
            found.append("tls_verify: false: the SMTP server's certificate is not checked")
        return found


def parse_server(value: str, security: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (the security's usual port)."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected HOST:PORT (IPv6 as [::1]:PORT), got {value!r}")
        port = rest[1:]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    elif ":" in value:
        raise ValueError(f"an IPv6 address needs brackets, as [::1]:PORT, got {value!r}")
    else:
        host, port = value, ""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"port out of range in {value!r}")
    return host, int(port) if port else DEFAULT_PORTS.get(security, 25)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
