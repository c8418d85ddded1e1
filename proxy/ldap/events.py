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
      "anonymous_refused", "protocol_error" (not LDAPv3), "internal_error",
      "operations_outstanding" (the bind waited ``bind_timeout`` for earlier
      operations to finish); "sasl_passthrough" for SASL binds relayed with
      ``sasl_passthrough = true``; an exempt bind the directory refuses is
      "bad_password" (or "directory_unavailable" for other result codes).
      ``seconds`` runs from the request to the answer.
  forwarded(op_name): "search", "modify", "add", "delete", "modify_dn",
      "compare", "extended", "abandon", "unbind", and "bind" for binds passed
      through as they are (exempt, anonymous, SASL with sasl_passthrough).
  refused(op_name, reason): an operation answered by the proxy itself, never
      forwarded; op_name as for forwarded, reason "bind_required" (before a
      successful bind, or after a failed one, with require_bind).
  upstream_error(reason): "connect_failed", "connect_timeout",
      "tls_handshake", "start_tls", "connection_lost", "malformed_response",
      "reset_failed" (the anonymous bind after a failed bind),
      "protocol_violation" (a response the proxy cannot have asked for: a
      BindResponse it did not wait for, or another response with the ID of
      its own bind in flight).
  dropped(reason): each closes one client connection, after a Notice of
      Disconnection: "malformed", "oversize", "idle_timeout", "upstream_lost",
      "protocol_error" (message ID 0 or out of range), "message_id_reused" (a
      request with the ID of one still outstanding), "bind_wait_timeout",
      "reset_failed", "bind_timeout" (a bind abandoned mid-flight: the
      upstream session is unknown), "upstream_protocol_violation",
      "unbound_timeout" (no successful bind within ``unbound_timeout``),
      "buffer_limit" (``max_buffered_bytes`` reached), "internal_error" (a bug);
      and refused at
      connect: "max_connections", "max_connections_per_source".
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class LdapEvents(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def bind(self, result: str, reason: str, seconds: float) -> None: ...

    def forwarded(self, op_name: str) -> None: ...

    def refused(self, op_name: str, reason: str) -> None: ...

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

    def refused(self, op_name: str, reason: str) -> None:
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

    def refused(self, op_name: str, reason: str) -> None:
        self.counts[("refused", op_name, reason)] += 1

    def upstream_error(self, reason: str) -> None:
        self.counts[("upstream_error", reason)] += 1

    def dropped(self, reason: str) -> None:
        self.counts[("dropped", reason)] += 1

    def __getitem__(self, key: tuple[str, ...]) -> int:
        return self.counts[key]
