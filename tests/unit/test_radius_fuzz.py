"""Property tests: no datagram, random or mutated, makes the RADIUS side raise.

Every datagram ends in a reply or a counted drop, never an internal error,
and the server still answers a valid request afterwards.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad.dictionary import Dictionary
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from policy.decision import AuthRequest, Decision, Outcome, Reason
from proxy.radius.clients import ClientTable, RadiusClientConfig
from proxy.radius.events import DropReason
from proxy.radius.packet import (
    SHIPPED_DICTIONARY,
    Attr,
    Code,
    Packet,
    hmac_md5,
    parse_datagram,
)
from proxy.radius.server import RadiusServer
from proxy.radius.testing import (
    RecordingEvents,
    access_request,
    accounting_request,
    build_request,
    verify_reply,
)

DICTIONARY = Dictionary(str(SHIPPED_DICTIONARY))
SECRET = b"fuzz-secret"
SOURCE = ("127.0.0.1", 5555)


def make_server() -> tuple[RadiusServer, RecordingEvents]:
    def core(request: AuthRequest):
        return succeed(Decision(Outcome.NEED_CODE if request.code is None else Outcome.ACCEPT,
                                Reason.OK, request.username))

    events = RecordingEvents()
    clients = ClientTable([
        RadiusClientConfig("strict", ("127.0.0.1",), SECRET),
        RadiusClientConfig("legacy", ("127.0.0.2",), SECRET,
                           require_message_authenticator=False),
    ])
    return RadiusServer(clients, core, DICTIONARY, events=events, clock=Clock()), events


MS_VSA = (311).to_bytes(4, "big") + b"\x01\x03x"
SEEDS = [
    access_request(SECRET, "alice", "s3cret,123456"),
    access_request(SECRET, "bob", "pw", state=b"0" * 32,
                   extra=[(Attr.PROXY_STATE, b"p1"), (26, MS_VSA)]),
    access_request(SECRET, "dave", "SCRV1:cHc=:MTIzNDU2", extra=[(Attr.CHAP_PASSWORD, bytes(17))]),
    access_request(SECRET, "carol", "pw", message_authenticator=False),
    build_request(Code.STATUS_SERVER, 1, SECRET, []),
    accounting_request(SECRET, [(Attr.USER_NAME, b"alice"),
                                (Attr.ACCT_STATUS_TYPE, (1).to_bytes(4, "big"))]),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "length"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[position:position + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "length" and len(data) >= 4:
            data[2:4] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    if len(data) >= 4 and draw(st.booleans()):  # keep the Length field honest
        data[2:4] = len(data).to_bytes(2, "big")
    if draw(st.booleans()):
        return resign(bytes(data))
    return bytes(data)


def resign(data: bytes) -> bytes:
    """Make a mutated packet's Message-Authenticator valid again, so that the
    mutation reaches the decoding behind the signature check."""
    packet = parse_datagram(data)
    if not isinstance(packet, Packet) or len(packet.message_authenticators) != 1:
        return data
    offset = packet.message_authenticators[0]
    if packet.raw[offset - 1] != 18:
        return data
    zeroed = packet.raw[:offset] + bytes(16) + packet.raw[offset + 16:]
    return zeroed[:offset] + hmac_md5(SECRET, zeroed) + zeroed[offset + 16:]


def feed(data: bytes) -> None:
    server, events = make_server()
    sent: list[bytes] = []
    for source in (SOURCE, ("127.0.0.2", 5555), ("::ffff:127.0.0.1", 1)):
        server.handle_auth(data, source, sent.append)
        server.handle_accounting(data, source, sent.append)
    assert events.drops[DropReason.INTERNAL_ERROR.value] == 0
    assert all(r[2] != "internal_error" for r in events.requests)
    # ... and it still answers a valid request
    request = access_request(SECRET, "zed", "pw,123456")
    server.handle_auth(request, ("127.0.0.1", 9999), sent.append)
    assert verify_reply(sent[-1], request, SECRET)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    parse_datagram(data)
    feed(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_packets_never_raise(data: bytes) -> None:
    feed(data)


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_parsed_packets_are_consistent(data: bytes) -> None:
    packet = parse_datagram(data)
    if not isinstance(packet, Packet):
        return
    assert len(packet.raw) == int.from_bytes(packet.raw[2:4], "big")
    assert 20 + sum(len(v) + 2 for _, v in packet.attributes) == len(packet.raw)
    for offset in packet.message_authenticators:
        assert packet.raw[offset - 2] == Attr.MESSAGE_AUTHENTICATOR
    list(packet.vendor_attributes())
    packet.uses_unsupported_auth()
