"""BER framing and the few LDAP messages the front-end reads and writes,
checked against the RFC 4511 ASN.1 definitions ldap3 ships (pyasn1)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3.protocol.rfc4511 import (
    LDAPDN,
    AuthenticationChoice,
    BindRequest,
    Control,
    Controls,
    Credentials,
    LDAPMessage,
    LDAPString,
    MessageID,
    ProtocolOp,
    SaslCredentials,
    Simple,
    Version,
)
from pyasn1.codec.ber import decoder, encoder

from backends.ldapwire import ber, messages
from backends.ldapwire.ber import BerError
from backends.ldapwire.framing import MessageFramer
from backends.ldapwire.messages import ResultCode
from tests.ldap_messages import search

# ---------------------------------------------------------------- helpers


def pyasn1_bind(
    message_id: int,
    name: str,
    password: bytes | None = None,
    mechanism: str | None = None,
    credentials: bytes | None = None,
    control_oid: str | None = None,
) -> bytes:
    """A BindRequest encoded by pyasn1 from ldap3's RFC 4511 definitions."""
    request = BindRequest()
    request["version"] = Version(3)
    request["name"] = LDAPDN(name)
    auth = AuthenticationChoice()
    if password is not None:
        auth["simple"] = Simple(password)
    else:
        sasl = SaslCredentials()
        sasl["mechanism"] = LDAPString(mechanism)
        if credentials is not None:
            sasl["credentials"] = Credentials(credentials)
        auth["sasl"] = sasl
    request["authentication"] = auth
    message = LDAPMessage()
    message["messageID"] = MessageID(message_id)
    op = ProtocolOp()
    op["bindRequest"] = request
    message["protocolOp"] = op
    if control_oid:
        control = Control()
        control["controlType"] = control_oid
        controls = Controls()
        controls.setComponentByPosition(0, control)
        message["controls"] = controls
    return bytes(encoder.encode(message))


def decoded(data: bytes) -> LDAPMessage:
    message, rest = decoder.decode(data, asn1Spec=LDAPMessage())
    assert rest == b""
    return message


# ---------------------------------------------------------------- framing


def test_many_messages_in_one_segment() -> None:
    sent = [search(i) for i in range(1, 51)]
    framer = MessageFramer(1 << 20)
    assert framer.feed(b"".join(sent)) == sent
    assert framer.buffered == 0


def test_messages_split_byte_by_byte() -> None:
    sent = [search(1), search(2, 300), messages.encode_bind_request(3, "uid=a", b"pw,123456")]
    framer = MessageFramer(1 << 20)
    out: list[bytes] = []
    for byte in b"".join(sent):
        out += framer.feed(bytes([byte]))
    assert out == sent
    assert framer.buffered == 0


def test_message_split_across_segments_with_next_message_started() -> None:
    first, second = search(1, 1000), search(2, 1000)
    stream = first + second
    framer = MessageFramer(1 << 20)
    assert framer.feed(stream[:700]) == []
    assert framer.feed(stream[700 : len(first) + 5]) == [first]
    assert framer.feed(stream[len(first) + 5 :]) == [second]


@pytest.mark.parametrize("size", [127, 128, 255, 256, 65535, 65536, 300_000])
def test_long_form_lengths(size: int) -> None:
    message = search(9, size)
    assert ber.read_header(message, 0, len(message))[2] == len(message)
    framer = MessageFramer(1 << 20)
    half = len(message) // 2
    assert framer.feed(message[:half]) == []
    assert framer.feed(message[half:]) == [message]
    assert decoded(message)["messageID"] == 9


def test_oversized_message_refused_from_its_header() -> None:
    framer = MessageFramer(1000)
    message = search(1, 5000)
    with pytest.raises(BerError) as raised:
        framer.feed(message[:4])  # the length alone says it is too big
    assert raised.value.oversize


def test_message_at_the_limit_passes() -> None:
    message = search(1, 900)
    assert MessageFramer(len(message)).feed(message) == [message]
    with pytest.raises(BerError):
        MessageFramer(len(message) - 1).feed(message)


@pytest.mark.parametrize(
    "data",
    [
        b"\x31\x03\x02\x01\x01",  # not a SEQUENCE
        b"\x30\x80\x02\x01\x01\x42\x00\x00\x00",  # indefinite length
        b"\x30\x85\x00\x00\x00\x00\x05",  # 5 length bytes
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_framer_refuses_garbage(data: bytes) -> None:
    with pytest.raises(BerError):
        MessageFramer(1 << 20).feed(data)


# ---------------------------------------------------------------- peek


def test_peek_reads_id_and_operation() -> None:
    message = search(1234567)
    header = messages.peek(message)
    assert (header.message_id, header.op_tag) == (1234567, messages.SEARCH_REQUEST)
    assert messages.peek_id_and_tag(message) == (1234567, messages.SEARCH_REQUEST)
    assert header.op_end == len(message)


def test_peek_with_controls() -> None:
    message = pyasn1_bind(5, "uid=a", b"pw", control_oid="1.3.6.1.4.1.42.2.27.8.5.1")
    header = messages.peek(message)
    assert header.op_tag == messages.BIND_REQUEST
    assert message[header.op_end] == messages.CONTROLS


@pytest.mark.parametrize(
    "data",
    [
        ber.tlv(0x30, b"\x04\x01\x01\x42\x00"),  # message ID not an INTEGER
        ber.tlv(0x30, b"\x02\x05\x01\x02\x03\x04\x05\x42\x00"),  # ID too long
        ber.tlv(0x30, b"\x02\x01\xff\x42\x00"),  # negative ID
        ber.tlv(0x30, b"\x02\x01\x01\x42\x00\x04\x00"),  # junk after the op
        ber.tlv(0x30, b"\x02\x01\x01\x63\x05\x04\x00"),  # op overruns
        ber.tlv(0x30, b"\x02\x01\x01"),  # no op
    ],
)
def test_peek_refuses_malformed(data: bytes) -> None:
    with pytest.raises(BerError):
        messages.peek(data)


# ---------------------------------------------------------------- BindRequest


def test_decode_simple_bind_from_pyasn1() -> None:
    message = pyasn1_bind(3, "uid=alice,ou=people,dc=example,dc=org", b"alice-pw,123456")
    request = messages.decode_bind_request(message)
    assert request.message_id == 3
    assert request.version == 3
    assert request.name == "uid=alice,ou=people,dc=example,dc=org"
    assert request.password == b"alice-pw,123456"
    assert request.is_simple and not request.is_anonymous
    assert request.controls == b""


def test_decode_bind_keeps_controls_raw() -> None:
    message = pyasn1_bind(3, "uid=a", b"pw", control_oid="1.3.6.1.4.1.42.2.27.8.5.1")
    request = messages.decode_bind_request(message)
    assert request.controls and request.controls[0] == messages.CONTROLS
    again = messages.encode_bind_request(3, "uid=a", b"other", request.controls)
    assert str(decoded(again)["controls"][0]["controlType"]) == "1.3.6.1.4.1.42.2.27.8.5.1"


def test_decode_anonymous_bind() -> None:
    request = messages.decode_bind_request(pyasn1_bind(1, "", b""))
    assert request.is_anonymous and request.is_simple


def test_decode_unauthenticated_bind() -> None:
    request = messages.decode_bind_request(pyasn1_bind(1, "uid=a,dc=x", b""))
    assert request.password == b"" and not request.is_anonymous


@pytest.mark.parametrize("credentials", [None, b"\x00\x01token"])
def test_decode_sasl_bind(credentials: bytes | None) -> None:
    message = pyasn1_bind(2, "", mechanism="GSSAPI", credentials=credentials)
    request = messages.decode_bind_request(message)
    assert not request.is_simple
    assert request.sasl_mechanism == "GSSAPI"
    assert request.sasl_credentials == credentials


def test_decode_bind_with_utf8_name_and_binary_password() -> None:
    message = pyasn1_bind(1, "uid=zoë,ou=people,dc=example,dc=org", b"\xff\xfe,123456")
    request = messages.decode_bind_request(message)
    assert request.name == "uid=zoë,ou=people,dc=example,dc=org"
    assert request.password == b"\xff\xfe,123456"


def test_decode_bind_refuses_non_utf8_name() -> None:
    body = ber.integer(3) + ber.tlv(0x04, b"uid=\xff") + ber.tlv(0x80, b"pw")
    with pytest.raises(BerError):
        messages.decode_bind_request(messages.ldap_message(1, ber.tlv(messages.BIND_REQUEST, body)))


def test_decode_bind_refuses_unknown_authentication() -> None:
    body = ber.integer(3) + ber.tlv(0x04, b"uid=a") + ber.tlv(0x81, b"x")
    with pytest.raises(BerError):
        messages.decode_bind_request(messages.ldap_message(1, ber.tlv(messages.BIND_REQUEST, body)))


def test_encoded_bind_request_matches_pyasn1() -> None:
    ours = messages.encode_bind_request(300, "uid=alice,dc=example,dc=org", b"pw" * 100)
    assert ours == pyasn1_bind(300, "uid=alice,dc=example,dc=org", b"pw" * 100)


# ---------------------------------------------------------------- responses


@pytest.mark.parametrize("code", [0, 7, 49, 52, 53])
def test_bind_response_decodes_with_pyasn1(code: int) -> None:
    message = decoded(messages.encode_bind_response(77, code, "invalid credentials"))
    assert int(message["messageID"]) == 77
    response = message["protocolOp"]["bindResponse"]
    assert int(response["resultCode"]) == code
    assert str(response["diagnosticMessage"]) == "invalid credentials"
    assert messages.decode_result(messages.encode_bind_response(77, code, "x")).code == code


def test_notice_of_disconnection() -> None:
    data = messages.encode_notice_of_disconnection(ResultCode.PROTOCOL_ERROR, "malformed")
    message = decoded(data)
    assert int(message["messageID"]) == 0
    response = message["protocolOp"]["extendedResp"]
    assert int(response["resultCode"]) == 2
    assert str(response["responseName"]) == "1.3.6.1.4.1.1466.20036"
    assert messages.extended_response_name(data) == messages.NOTICE_OF_DISCONNECTION_OID


@pytest.mark.parametrize(
    ("request_tag", "choice"),
    [
        (messages.SEARCH_REQUEST, "searchResDone"),
        (messages.MODIFY_REQUEST, "modifyResponse"),
        (messages.ADD_REQUEST, "addResponse"),
        (messages.DEL_REQUEST, "delResponse"),
        (messages.MODDN_REQUEST, "modDNResponse"),
        (messages.COMPARE_REQUEST, "compareResponse"),
        (messages.EXTENDED_REQUEST, "extendedResp"),
    ],
)
def test_generic_result_for_each_operation(request_tag: int, choice: str) -> None:
    response_tag = messages.response_for(request_tag)
    assert response_tag is not None
    message = decoded(messages.encode_result(5, response_tag, 50, "bind required"))
    assert int(message["protocolOp"][choice]["resultCode"]) == 50


def test_extended_request_name_and_start_tls_response() -> None:
    request = messages.encode_extended_request(4, messages.START_TLS_OID)
    assert messages.extended_request_name(request) == messages.START_TLS_OID
    assert str(decoded(request)["protocolOp"]["extendedReq"]["requestName"]) == (
        "1.3.6.1.4.1.1466.20037"
    )
    response = messages.encode_extended_response(4, 0, "", messages.START_TLS_OID)
    assert messages.extended_response_name(response) == messages.START_TLS_OID


def test_abandon_target() -> None:
    message = messages.ldap_message(9, ber.integer(5, messages.ABANDON_REQUEST))
    assert messages.abandoned_message_id(message) == 5


# ---------------------------------------------------------------- garbage


def _decode_everything(message: bytes) -> None:
    """Every reader the server may run on a message: only BerError may come out."""
    header = messages.peek(message)
    messages.peek_id_and_tag(message)
    for reader in (
        messages.decode_bind_request,
        messages.decode_result,
        messages.extended_request_name,
        messages.extended_response_name,
        messages.abandoned_message_id,
    ):
        with contextlib.suppress(BerError):
            reader(message, header)  # type: ignore[operator]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_garbage_never_raises_anything_but_ber_error(data: bytes, chunk: int) -> None:
    framer = MessageFramer(4096)
    try:
        for start in range(0, len(data), chunk):
            for message in framer.feed(data[start : start + chunk]):
                with contextlib.suppress(BerError):
                    _decode_everything(message)
    except BerError:
        pass


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """Valid binds and searches with a few bytes flipped, cut or inserted."""
    base = draw(
        st.sampled_from(
            [
                pyasn1_bind(1, "uid=alice,dc=x", b"pw,123456"),
                pyasn1_bind(2, "", mechanism="PLAIN", credentials=b"x"),
                pyasn1_bind(3, "uid=a", b"pw", control_oid="1.2.3"),
                search(4, 200),
                messages.encode_extended_request(5, messages.START_TLS_OID),
                messages.encode_notice_of_disconnection(2, "x"),
            ]
        )
    )
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position]
        else:
            data.insert(position, draw(st.integers(0, 255)))
        if not data:
            break
    return bytes(data)


@settings(max_examples=1000, deadline=None)
@given(near_valid())
def test_mutated_messages_never_raise_anything_but_ber_error(data: bytes) -> None:
    try:
        for message in MessageFramer(4096).feed(data):
            _decode_everything(message)
    except BerError:
        pass
