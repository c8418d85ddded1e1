"""What the LDAP front-end reports, for metrics and logs.

The front-end never imports a metrics library: ``proxy/service.py`` hands
it an :class:`LdapEvents` that feeds Prometheus. Every argument is a bounded
label (never a username, DN or address).

Labels used:
  bind(result, reason, seconds)
      result: "accept" | "reject"; reason: a ``policy.decision.Reason``
      value for MFA binds (e.g. "ok", "in_enrollment", "bad_code",
      "bad_password", "locked_out", "directory_unavailable"), "repeat" for
      a bind-cache hit, "exempt" and "anonymous" for binds passed through,
      and for binds refused by the front-end itself: "empty_password",
      "invalid_username" (password without a name), "sasl_not_supported",
      "anonymous_refused", "protocol_error" (not LDAPv3), "internal_error";
      an exempt bind the directory refuses is "bad_password" (or
      "directory_unavailable" for other result codes). ``seconds`` runs from
      the request to the answer.
  forwarded(op_name): "search", "modify", "add", "delete", "modify_dn",
      "compare", "extended", "abandon", "unbind", and "bind" for binds passed
      through as they are (exempt, anonymous).
  upstream_error(reason): "connect_failed", "connect_timeout",
      "tls_handshake", "start_tls", "connection_lost", "malformed_response",
      "reset_failed" (the anonymous bind after a failed MFA bind).
  dropped(reason): "malformed", "oversize", "max_connections",
      "idle_timeout", "upstream_lost" (each closes one client connection,
      after a Notice of Disconnection).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class LdapEvents(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def bind(self, result: str, reason: str, seconds: float) -> None: ...

    def forwarded(self, op_name: str) -> None: ...

    def upstream_error(self, reason: str) -> None: ...

    def dropped(self, reason: str) -> None: ...


class NullLdapEvents:
    """Reports nothing (the default)."""

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def bind(self, result: str, reason: str, seconds: float) -> None:
        pass

    def forwarded(self, op_name: str) -> None:
        pass

    def upstream_error(self, reason: str) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


class CountingLdapEvents:
    """Counts every event by its labels; for tests and debugging."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.open_connections = 0

    def connection_opened(self) -> None:
        self.open_connections += 1
        self.counts[("connection_opened",)] += 1

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.counts[("connection_closed",)] += 1

    def bind(self, result: str, reason: str, seconds: float) -> None:
        self.counts[("bind", result, reason)] += 1

    def forwarded(self, op_name: str) -> None:
        self.counts[("forwarded", op_name)] += 1

    def upstream_error(self, reason: str) -> None:
        self.counts[("upstream_error", reason)] += 1

    def dropped(self, reason: str) -> None:
        self.counts[("dropped", reason)] += 1

    def __getitem__(self, key: tuple[str, ...]) -> int:
        return self.counts[key]
