"""Log and audit injection: no text from a client can break a log line."""

from __future__ import annotations

import io
import logging
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.engine import DECISION_LINE
from policy.escaping import escape_controls, is_control
from proxy.logs import SERVE_FORMAT, EscapingFormatter, escaping_handler, install_last_resort

FORGED = "alice\nFORGED decision user=admin result=accept"


@pytest.mark.parametrize(("raw", "shown"), [
    ("alice", "alice"),
    ("DOMAIN\\alice", "DOMAIN\\alice"),  # backslashes are not controls: left alone
    ("élodie 山田", "élodie 山田"),
    ("a\u00a0b", "a\u00a0b"),  # a no-break space breaks no line
    (FORGED, "alice\\nFORGED decision user=admin result=accept"),
    ("a\rb\tc", "a\\rb\\tc"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("nul\x00 del\x7f", "nul\\x00 del\\x7f"),
    ("nel\u0085", "nel\\x85"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("rlo\u202egnp.exe zwsp\u200b", "rlo\\u202egnp.exe zwsp\\u200b"),
    ("lone \udcff surrogate", "lone \\udcff surrogate"),
    ("private \U000f0000", "private \\U000f0000"),
])
def test_every_control_character_is_a_visible_escape(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown


@given(st.text(st.characters(codec=None)))
def test_escaped_text_has_no_control_character_left(text: str) -> None:
    escaped = escape_controls(text)
    assert not any(is_control(c) for c in escaped)
    assert len(escaped.splitlines()) <= 1  # every line boundary Python knows is gone
    if not any(is_control(c) for c in text):
        assert escaped == text


def test_is_control_covers_categories_c_and_the_line_separators() -> None:
    for n in (*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029, 0x200e, 0xfeff, 0xe000):
        assert is_control(chr(n)), hex(n)
    assert unicodedata.category("\u2028") == "Zl"  # not C*, and still a line end
    assert not any(is_control(c) for c in " aZ9\\\u00a0é€")


def record(msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("mfa_proxy.policy", logging.INFO, __file__, 1, msg, args,
                             exc_info)  # type: ignore[arg-type]


def test_formatter_escapes_the_message_and_its_arguments() -> None:
    formatter = EscapingFormatter(SERVE_FORMAT)
    line = formatter.format(record("decision user=%s protocol=%s result=%s", FORGED,
                                   "radius", "reject"))
    assert "\n" not in line
    assert line.endswith(": decision user=alice\\nFORGED decision user=admin result=accept "
                         "protocol=radius result=reject")
    # the message itself, not only its arguments
    assert formatter.format(record("a\x1b[2Jb\u2029c")).endswith(": a\\x1b[2Jb\\u2029c")


def test_formatter_keeps_the_traceback_lines_after_the_escaped_message() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    text = EscapingFormatter(SERVE_FORMAT).format(record("failed for %s", FORGED, exc_info=info))
    first, *rest = text.split("\n")
    assert first.endswith(": failed for alice\\nFORGED decision user=admin result=accept")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"
    assert not any(line.startswith("FORGED") for line in rest)


def test_serve_logging_writes_one_line_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logger = logging.getLogger("test_logs.serve")
    logger.propagate = False
    logger.addHandler(escaping_handler())
    try:
        logger.warning("lockout user=%s", FORGED)
    finally:
        logger.handlers.clear()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and " WARNING test_logs.serve: lockout user=alice\\nFORGED" in lines[0]


def test_serve_installs_the_escaping_formatter(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import service

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # basicConfig acts only on a bare root
    monkeypatch.setattr(root, "level", root.level)
    twisted_start = []
    monkeypatch.setattr("twisted.logger.globalLogBeginner.beginLoggingTo",
                        lambda *a, **k: twisted_start.append(a))
    service.setup_logging("info")
    (handler,) = root.handlers
    assert isinstance(handler.formatter, EscapingFormatter)
    assert root.level == logging.INFO and twisted_start


def test_admin_commands_get_an_escaping_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "lastResort", logging.lastResort)
    install_last_resort()
    install_last_resort()  # idempotent
    handler = logging.lastResort
    assert handler is not None and isinstance(handler.formatter, EscapingFormatter)
    assert handler.level == logging.WARNING
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    handler.handle(record("%s is readable by other users", "/tmp/x\nFORGED"))
    assert out.getvalue() == "/tmp/x\\nFORGED is readable by other users\n"


# -- [logging] format = "json" ----------------------------------------------------------


def json_line(msg: str, *args: object, **extra: object) -> dict[str, object]:
    import json

    from proxy.logs import JsonFormatter

    rec = record(msg, *args)
    for k, v in extra.items():
        setattr(rec, k, v)
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "\u2028" not in line
    return dict(json.loads(line))


def test_json_decision_line_has_the_stable_keys() -> None:
    obj = json_line(DECISION_LINE, "alice", "radius", "vpn", "10.0.0.1", "reject",
                    "bad_code", "2.5", "4f2a9c-1b")
    assert obj["event"] == "decision" and obj["level"] == "info"
    assert obj["logger"] == "mfa_proxy.policy"
    assert {k: obj[k] for k in ("user", "protocol", "client", "source", "result", "reason",
                                "latency_ms", "request_id")} == {
        "user": "alice", "protocol": "radius", "client": "vpn", "source": "10.0.0.1",
        "result": "reject", "reason": "bad_code", "latency_ms": 2.5, "request_id": "4f2a9c-1b"}
    assert str(obj["time"]).endswith("Z") and "T" in str(obj["time"])
    assert obj["message"].startswith("decision user=alice protocol=radius")  # type: ignore[union-attr]


def test_json_keeps_escaping_what_a_client_sent() -> None:
    obj = json_line("decision user=%s result=%s", FORGED + "\x1b[2J\u2028", "accept")
    assert obj["user"] == "alice\\nFORGED decision user=admin result=accept\\x1b[2J\\u2028"
    assert "\x1b" not in str(obj["message"]) and "\n" not in str(obj["message"])


def test_json_plain_messages_extra_fields_and_tracebacks() -> None:
    import json

    from proxy.logs import JsonFormatter

    assert json_line("http listening on %s", "127.0.0.1:9812")["event"] == "log"
    assert json_line("%d%% done", 100)["message"] == "100% done"
    assert json_line("reloaded", event="reload", result="success")["event"] == "reload"
    assert json_line("x latency_ms=%s", "-")["latency_ms"] is None
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed for %s", "bob", exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["traceback"]


def test_json_handler_writes_one_object_per_line_to_stderr(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import json

    from proxy.logs import serve_handler

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    logger = logging.getLogger("test_json_handler")
    logger.propagate = False
    logger.addHandler(serve_handler("json"))
    logger.warning("lockout user=%s failures=%d until=%s", "alice", 5, 1700000900)
    (obj,) = [json.loads(line) for line in err.getvalue().splitlines()]
    assert obj["event"] == "lockout" and obj["failures"] == 5 and obj["level"] == "warning"


def test_twisted_port_chatter_is_debug(caplog: pytest.LogCaptureFixture) -> None:
    from proxy.logs import TwistedChatter

    twisted = logging.getLogger("twisted-chatter-test")
    twisted.addFilter(TwistedChatter())
    root = logging.getLogger()
    old = root.level
    try:
        root.setLevel(logging.INFO)
        with caplog.at_level(logging.INFO):
            for line in ("RadiusPort starting on 1812", "Starting protocol <x object at 0x1>",
                         "Stopping protocol <x>", "(UDP Port 1812 Closed)",
                         "(TCP Port 9812 Closed)", "Starting factory <f>",
                         "Main loop terminated.", "something that matters"):
                twisted.info(line)
        assert [r.getMessage() for r in caplog.records] == ["something that matters"]
        root.setLevel(logging.DEBUG)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            twisted.info("RadiusPort starting on 1812")
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("DEBUG", "RadiusPort starting on 1812")]
    finally:
        root.setLevel(old)
