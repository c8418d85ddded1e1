"""Log records that cannot break a log line, and log lines a flood cannot multiply.

Every message goes through :func:`policy.escaping.escape_controls`: a newline,
carriage return, ESC, NUL, U+0085, U+2028... in anything a client sent (a
RADIUS User-Name, an LDAP DN) shows as ``\\n``, ``\\x1b``, ``\\u2028``, so one
record is one line and nobody can forge the next one.  A traceback (from
``exc_info``) keeps its lines: it is our text, and it follows the message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

from policy.escaping import escape_controls

SERVE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class EscapingFormatter(logging.Formatter):
    """A Formatter whose message part (not the traceback) has its control
    characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        return escape_controls(super().formatMessage(record))


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (as logging's own
    last-resort handler does), so a swapped stderr (click's test runner) is
    never written to after it was closed."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        logging.Handler.__init__(self, level)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def escaping_handler(fmt: str = SERVE_FORMAT, level: int = logging.NOTSET) -> logging.Handler:
    handler = StderrHandler(level)
    handler.setFormatter(EscapingFormatter(fmt))
    return handler


def install_last_resort() -> None:
    """For the admin commands, which configure no logging: Python then prints
    WARNING and above through ``logging.lastResort`` as bare messages.  The same
    bare messages, escaped."""
    if not isinstance(logging.lastResort, StderrHandler):
        logging.lastResort = escaping_handler("%(message)s", logging.WARNING)


class LogLimiter:
    """At most one log line per key per ``interval`` seconds, with bounded memory:
    a flood of connections must not become a flood of log lines (the metrics
    still count every event)."""

    def __init__(self, clock: Callable[[], float], interval: float = 60.0,
                 max_keys: int = 1024) -> None:
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if last is None and len(self._last) >= self._max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            if len(self._last) >= self._max_keys:
                return False
        self._last[key] = now
        return True
