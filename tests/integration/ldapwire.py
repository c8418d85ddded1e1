"""Raw LDAP over a socket, for the tests that send what no well-behaved client
sends (reused message IDs, pipelined binds, SASL PLAIN with any bind name) and
read every message that comes back, the close included."""

from __future__ import annotations

import socket

from backends.ldapwire import ber, framing, messages

UNBIND = messages.ldap_message(999, b"\x42\x00")

SESSION_TIMEOUT = 15.0  # seconds a raw session may wait for one answer (a hang fails the test)


class RawSession:
    """A raw LDAP connection: send any bytes, read messages, see the close."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=SESSION_TIMEOUT, source_address=(source, 0)
        )
        self._framer = framing.MessageFramer(1 << 24)
        self.received: list[bytes] = []
        self.closed = False
        self.notice: messages.LdapResult | None = None

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return
        for message in self._framer.feed(chunk):
            if messages.peek(message).message_id == 0:
                self.notice = messages.decode_result(message)
            self.received.append(message)

    def final(self, wanted: list[int]) -> dict[int, bytes]:
        """Read until a final response for each ID in ``wanted`` (or the close);
        the last final response seen for each ID."""
        missing = list(wanted)
        seen: dict[int, bytes] = {}
        start = len(self.received)
        while missing and not self.closed:
            self._read()
            for message in self.received[start:]:
                message_id, tag = messages.peek_id_and_tag(message)
                if tag in messages.FINAL_RESPONSES and message_id in missing:
                    missing.remove(message_id)
                    seen[message_id] = message
            start = len(self.received)
        return seen

    def wait_closed(self) -> None:
        try:
            while not self.closed:
                self._read()
        except TimeoutError:
            raise AssertionError(f"still open {SESSION_TIMEOUT} s later") from None

    def whoami(self, message_id: int) -> str | None:
        """The authzId the directory reports ("" anonymous), None when refused or closed."""
        if self.closed:
            return None
        self.send(messages.encode_extended_request(message_id, messages.WHO_AM_I_OID))
        response = self.final([message_id]).get(message_id)
        return authz_id(response) if response is not None else None


def authz_id(response: bytes) -> str | None:
    """The responseValue of a successful WhoAmI ExtendedResponse."""
    header = messages.peek(response)
    if header.op_tag != messages.EXTENDED_RESPONSE or messages.decode_result(response).code != 0:
        return None
    pos = header.op_start
    for _ in range(3):  # resultCode, matchedDN, diagnosticMessage
        _, _, pos = ber.read_header(response, pos, header.op_end)
    while pos < header.op_end:
        tag, start, stop = ber.read_header(response, pos, header.op_end)
        if tag == 0x8B:  # [11] responseValue
            return response[start:stop].decode()
        pos = stop
    return ""


def raw_search(message_id: int, base: str) -> bytes:
    """A base-object search of ``base`` for its cn."""
    body = (
        ber.tlv(0x04, base.encode())
        + ber.integer(0, ber.ENUMERATED)  # baseObject
        + ber.integer(0, ber.ENUMERATED)
        + ber.integer(0)
        + ber.integer(0)
        + b"\x01\x01\x00"
        + ber.tlv(0x87, b"objectClass")
        + ber.tlv(0x30, ber.tlv(0x04, b"cn"))
    )
    return messages.ldap_message(message_id, ber.tlv(messages.SEARCH_REQUEST, body))


def sasl_plain_bind(message_id: int, name: str, authcid: str, password: str) -> bytes:
    credentials = b"\0" + authcid.encode() + b"\0" + password.encode()
    sasl = ber.tlv(0x04, b"PLAIN") + ber.tlv(0x04, credentials)
    body = ber.integer(3) + ber.tlv(0x04, name.encode()) + ber.tlv(messages.AUTH_SASL, sasl)
    return messages.ldap_message(message_id, ber.tlv(messages.BIND_REQUEST, body))


def result_code(response: bytes) -> int:
    return messages.decode_result(response).code
