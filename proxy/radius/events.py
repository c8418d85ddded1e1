"""What the RADIUS front-end reports, as plain method calls.

The front-end never imports prometheus: ``proxy/service.py`` hands it an
object with these methods (wired to the metrics) and tests hand it a
recorder.  Every label value is bounded: a configured client name, a
result, a reason from the enums below or from ``policy.decision.Reason``.
"""

from __future__ import annotations

import enum
from typing import Protocol


class DropReason(enum.StrEnum):
    """Why a datagram got no answer (``mfa_proxy_radius_dropped_total{reason}``)."""

    TOO_SHORT = "too_short"  # under the 20-octet header
    BAD_LENGTH = "bad_length"  # Length field under 20 or beyond the datagram
    TOO_LONG = "too_long"  # Length field over 4096 (RFC 2865 §3)
    BAD_ATTRIBUTE_LENGTH = "bad_attribute_length"  # an attribute under 2 octets or overrunning
    UNKNOWN_CLIENT = "unknown_client"
    UNSUPPORTED_CODE = "unsupported_code"  # a packet code this port does not serve
    BAD_MESSAGE_AUTHENTICATOR = "bad_message_authenticator"  # also: a wrong shared secret
    MISSING_MESSAGE_AUTHENTICATOR = "missing_message_authenticator"
    BAD_REQUEST_AUTHENTICATOR = "bad_request_authenticator"  # accounting, wrong secret
    DUPLICATE_IN_PROGRESS = "duplicate_in_progress"  # retransmission while deciding
    INTERNAL_ERROR = "internal_error"  # a bug; logged with its traceback
    # SIGTERM: the process is draining; a NAS that hears nothing fails over.
    SHUTTING_DOWN = "shutting_down"


class LocalReason(enum.StrEnum):
    """Rejects the front-end gives without asking the core.

    They never reach the core, so they never count as a user's failure.
    """

    UNSUPPORTED_AUTH = "unsupported_auth"  # CHAP, MS-CHAP, EAP: no password to check
    MISSING_USERNAME = "missing_username"
    MISSING_PASSWORD = "missing_password"  # noqa: S105 (a label, not a password)
    # bad length or not UTF-8 (often a wrong secret)
    MALFORMED_PASSWORD = "malformed_password"  # noqa: S105 (a label)
    BAD_STATE = "bad_state"  # unknown, expired, used, or another client's or user's State
    INTERNAL_ERROR = "internal_error"  # the core raised: a bug, answered with a reject


class RadiusEvents(Protocol):
    """The metrics hooks of the RADIUS front-end."""

    def request(self, client: str, result: str, reason: str) -> None:
        """An Access-Request was answered: result is accept, reject or challenge."""

    def dropped(self, reason: str) -> None:
        """A datagram was dropped (a :class:`DropReason` value)."""

    def decision_seconds(self, seconds: float) -> None:
        """How long the core took to decide one Access-Request."""

    def accounting(self, client: str) -> None:
        """An Accounting-Request was answered."""

    def retransmission(self, client: str) -> None:
        """A retransmission was answered from the duplicate cache."""


class NoEvents:
    """Reports nothing: the default when no metrics are wired."""

    def request(self, client: str, result: str, reason: str) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def decision_seconds(self, seconds: float) -> None:
        pass

    def accounting(self, client: str) -> None:
        pass

    def retransmission(self, client: str) -> None:
        pass
