"""Cutting a byte stream into LDAPMessages, for both sides.

One message's size is read from its outer header alone (:func:`message_size`),
so framing never decodes a message. :class:`MessageFramer` keeps what a
stream has delivered of an incomplete message and hands over whole ones:
as bytes of their own (:meth:`~MessageFramer.feed`, the front-end, which
queues and relays them) or where they lie in the received data
(:meth:`~MessageFramer.dispatch`, the directory client, which decodes each
reply in place and keeps none).
"""

from __future__ import annotations

from collections.abc import Callable

from backends.ldapwire.ber import SEQUENCE, BerError

MAX_MESSAGE = 64 * 1024 * 1024  # the directory client's limit: a larger reply is an error


def message_size(buf: bytes | bytearray, pos: int, end: int, max_size: int) -> int:
    """Whole size of the message starting at ``pos`` (< ``end``); -1 while its
    header is incomplete. Raises BerError on a malformed or oversized header."""
    if buf[pos] != SEQUENCE:
        raise BerError("not an LDAPMessage")
    if pos + 2 > end:
        return -1
    first = buf[pos + 1]
    if first < 0x80:
        size = 2 + first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise BerError("unsupported length form")
        if pos + 2 + count > end:
            return -1
        size = 2 + count + int.from_bytes(buf[pos + 2 : pos + 2 + count], "big")
    if size > max_size:
        raise BerError(f"message of {size} bytes exceeds {max_size}", oversize=True)
    return size


def frame_size(buf: bytes | bytearray, pos: int, max_size: int = MAX_MESSAGE) -> int | None:
    """Size of the complete LDAPMessage at ``pos``, or None while more bytes are due."""
    end = len(buf)
    if pos >= end:
        return None
    size = message_size(buf, pos, end, max_size)
    return size if 0 <= size <= end - pos else None


class MessageFramer:
    """Cuts a byte stream into whole LDAPMessages.

    Feed it what the transport delivers; it hands over the complete messages
    in order and keeps the rest. A message split over many segments is joined
    once, when its last byte arrives; several messages in one segment come
    out together. A message whose header announces more than ``max_size``
    bytes is refused as soon as the header is read.

    The rest is kept in one bytearray, not as the segments it came in: a
    peer trickling a message a byte at a time costs its bytes, not a Python
    object per segment. ``clear()`` gives the memory back.

    Both methods raise BerError on a malformed or oversized message; what
    was buffered is then dropped (the caller closes the connection).
    """

    __slots__ = ("max_size", "_pending", "_need")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._pending = bytearray()  # the start of an incomplete message
        self._need = 0  # size of the incomplete message, once its header is known

    @property
    def buffered(self) -> int:
        """Bytes held back, waiting for the rest of a message."""
        return len(self._pending)

    def clear(self) -> None:
        self._pending = bytearray()  # a new one: the old buffer is freed, not kept
        self._need = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The messages ``data`` completes, each as bytes of its own."""
        if self._pending:
            joined = self._joined(data)
            if joined is None:
                return []
            data = joined
        messages: list[bytes] = []
        pos = 0
        end = len(data)
        size = 0
        while pos < end:
            size = message_size(data, pos, end, self.max_size)
            if size < 0 or pos + size > end:
                break
            messages.append(data if size == end and pos == 0 else data[pos : pos + size])
            pos += size
        if pos < end:
            self._keep(data, pos, size)
        return messages

    def dispatch(self, data: bytes, handle: Callable[[bytes, int, int], object]) -> None:
        """``handle(buffer, start, end)`` for each message ``data`` completes, in
        order, where it lies: no copy of each message (``buffer`` is ``data``, or
        the joined rest of a message that came in pieces). Whatever ``handle``
        raises ends the dispatch."""
        if self._pending:
            joined = self._joined(data)
            if joined is None:
                return
            data = joined
        pos = 0
        end = len(data)
        size = 0
        max_size = self.max_size
        while pos < end:
            size = message_size(data, pos, end, max_size)
            if size < 0 or pos + size > end:
                break
            handle(data, pos, pos + size)
            pos += size
        if pos < end:
            self._keep(data, pos, size)

    def _joined(self, data: bytes) -> bytes | None:
        """The pending bytes and ``data`` as one buffer; None while the message
        whose size is known is still incomplete (the common wait for the rest
        of a large one)."""
        self._pending += data
        if self._need and len(self._pending) < self._need:
            return None
        joined = bytes(self._pending)  # one copy per completed message, not per piece
        self.clear()
        return joined

    def _keep(self, data: bytes, pos: int, size: int) -> None:
        self._pending = bytearray(memoryview(data)[pos:])
        self._need = max(size, 0)
