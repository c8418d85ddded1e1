"""Writing to TCP transports with less latency than Twisted's default, for both sides.

Twisted's ``write()`` only queues: the bytes go out on the next reactor
iteration, after two epoll_ctl calls (start and stop watching for
writability). The front-end writes once per message in each direction, so
that is paid four times per forwarded operation; the directory client pays
it once per search or bind it sends. When nothing is queued on a plain
TCP transport, :func:`write_now` sends at once with the transport's own
``writeSomeData`` and queues only what the kernel did not take; anything
else (TLS, queued data, an unknown transport) takes the ordinary path, so
order and back-pressure are unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write_now(transport: Any, data: bytes) -> None:
    if _idle_plain_tcp(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            if sent < len(data):
                transport.write(data[sent:])
            return
    transport.write(data)


def write_sequence_now(transport: Any, messages: list[bytes]) -> None:
    write_now(transport, messages[0] if len(messages) == 1 else b"".join(messages))


def _idle_plain_tcp(transport: Any) -> bool:
    """A connected tcp.Connection, not under TLS, with nothing waiting to be sent."""
    return bool(
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", True)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
        and len(transport.dataBuffer) == transport.offset
        and not getattr(transport, "_tempDataBuffer", True)
    )


def set_no_delay(transport: Any) -> None:
    """Small request/response messages: Nagle's algorithm would hold a
    response back until the previous one is acknowledged."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        setter(True)
