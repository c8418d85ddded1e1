"""Log records that cannot break a log line, and log lines a flood cannot multiply.

Every message goes through :func:`policy.escaping.escape_controls`: a newline,
carriage return, ESC, NUL, U+0085, U+2028... in anything a client sent (a
RADIUS User-Name, an LDAP DN) shows as ``\\n``, ``\\x1b``, ``\\u2028``, so one
record is one line and nobody can forge the next one.  A traceback (from
``exc_info``) keeps its lines: it is our text, and it follows the message.

``[logging] format = "json"`` (:class:`JsonFormatter`): one JSON object per
line, for journald and container log collectors. Its keys are stable: ``time``
(ISO 8601, UTC), ``level``, ``logger``, ``event``, ``message``, and for the
records that carry them ``user``, ``client``, ``source``, ``protocol``,
``result``, ``reason``, ``latency_ms``, ``request_id`` (read from the
``key=%s`` fields of the message, or given with ``extra=``). No log record
carries a password, a code or a key, in either format: the messages never
have them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from policy.escaping import escape_controls

SERVE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class EscapingFormatter(logging.Formatter):
    """A Formatter whose message part (not the traceback) has its control
    characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        return escape_controls(super().formatMessage(record))


# The keys a JSON record may carry besides time, level, logger, event, message.
STABLE_KEYS = ("user", "client", "source", "protocol", "result", "reason", "latency_ms",
               "request_id")
_PLACEHOLDER = re.compile(
    r"(?:(\w+)=)?%(?:\(\w+\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?([diouxXeEfFgGcrsa%])")
_EVENT = re.compile(r"^([a-z][a-z_]*) \w+=%")
_NUMERIC = frozenset({"latency_ms", "failures"})


def message_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``key=%s`` fields of a %-style message, by name: ``"decision user=%s
    result=%s"`` with ("alice", "accept") gives user and result."""
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
        return {}
    fields: dict[str, Any] = {}
    args = iter(record.args)
    for match in _PLACEHOLDER.finditer(record.msg):
        name, kind = match.groups()
        if kind == "%":
            continue
        try:
            value = next(args)
        except StopIteration:
            break
        if name:
            fields[name] = value
    return fields


def _json_value(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = escape_controls(str(value))
    if name in _NUMERIC:
        try:
            return float(text) if name == "latency_ms" else int(text)
        except ValueError:
            return None
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.getMessage())
        fields = message_fields(record)
        event = getattr(record, "event", None)
        if event is None:
            leading = _EVENT.match(record.msg) if isinstance(record.msg, str) else None
            event = leading.group(1) if leading else "log"
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name,
            "event": escape_controls(str(event)), "message": message}
        for name, value in fields.items():
            out.setdefault(name, _json_value(name, value))
        for name in STABLE_KEYS:
            if name in record.__dict__:
                out[name] = _json_value(name, record.__dict__[name])
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


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


def serve_handler(fmt: str = "text") -> logging.Handler:
    """The handler ``serve`` logs through: escaped text lines, or JSON lines."""
    if fmt == "json":
        handler = StderrHandler()
        handler.setFormatter(JsonFormatter())
        return handler
    return escaping_handler()


def install_last_resort() -> None:
    """For the admin commands, which configure no logging: Python then prints
    WARNING and above through ``logging.lastResort`` as bare messages.  The same
    bare messages, escaped."""
    if not isinstance(logging.lastResort, StderrHandler):
        logging.lastResort = escaping_handler("%(message)s", logging.WARNING)


# Twisted's own lines about ports and protocols coming and going: serve says what
# it listens on in its own words ("radius listening on ..."), so these are debug.
_TWISTED_CHATTER = re.compile(
    r"^(?:\S+ starting on \S+|\((?:TCP|UDP|Port) Port \S+ Closed\)|"
    r"(?:Starting|Stopping) (?:protocol|factory) .*|Main loop terminated\.)$", re.DOTALL)


class TwistedChatter(logging.Filter):
    """Demotes Twisted's "Starting protocol", "… starting on PORT", "(UDP Port …
    Closed)" lines to DEBUG (shown only with [logging] level = "debug")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not _TWISTED_CHATTER.match(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


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
