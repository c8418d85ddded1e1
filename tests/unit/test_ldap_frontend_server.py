"""The LDAP front-end's connection logic, without sockets: the client side is a
StringTransport, the upstream directory a fake that answers over another
one, time a Clock. The core is the real one (RealCore: the product's engine
on SQLite, with an in-memory directory for its look-ups and password checks)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from backends.base import Identity
from backends.ldapwire import ber, framing, messages
from backends.ldapwire.messages import ResultCode
from policy.decision import Decision, MfaMode, Outcome, Reason
from policy.engine import CREDENTIALS
from proxy.ldap.config import BindCacheRule, LdapFrontendConfig
from proxy.ldap.events import CountingLdapEvents
from proxy.ldap.server import LdapProxyFactory, LdapProxyProtocol
from proxy.ldap.upstream import UpstreamConnection, UpstreamOwner, UpstreamSettings
from tests.ldap_messages import BASE, UNKNOWN_OID, abandon, entry, search, whoami
from tests.unit.test_ldap_frontend_ber import near_valid
from tests.unit.test_ldap_frontend_fakes import USERS, MemoryDirectory, RealCore

ALICE = f"uid=alice,ou=people,{BASE}"
PROXY_UNBIND_ID = 2**31 - 1  # proxy/ldap/upstream.py
BOB = f"uid=bob,ou=people,{BASE}"
SVC = f"cn=svc,ou=services,{BASE}"
PASSWORDS = {ALICE: b"alice-pw", BOB: b"bob-pw", SVC: b"svc-secret"}
PEER = IPv4Address("TCP", "10.0.0.7", 40000)


# ---------------------------------------------------------------- the fake directory


class _Wire(StringTransport):
    """The proxy's upstream transport: what is written reaches the directory."""

    def __init__(self, directory: FakeDirectory, connection: UpstreamConnection) -> None:
        super().__init__()
        self._directory = directory
        self._connection = connection
        self._framer = framing.MessageFramer(1 << 24)

    def write(self, data: bytes) -> None:
        super().write(data)
        for message in self._framer.feed(data):
            self._directory.received(self._connection, message)


@dataclass
class FakeDirectory:
    auto: bool = True  # answer at once; else hold until release()
    refuse_connect: bool = False
    entries: int = 3
    bind_results: dict[bytes, int] = field(default_factory=dict)  # password → forced code
    requests: list[bytes] = field(default_factory=list)
    binds: list[tuple[str, bytes]] = field(default_factory=list)
    held: list[tuple[UpstreamConnection, bytes]] = field(default_factory=list)
    connections: list[UpstreamConnection] = field(default_factory=list)
    # The proxy's own UnbindRequest when it ends a session (kept out of requests,
    # which are what the client's messages made the proxy send).
    proxy_unbinds: int = 0

    def connect(
        self, reactor: Any, settings: UpstreamSettings, owner: UpstreamOwner
    ) -> UpstreamConnection:
        connection = UpstreamConnection(owner, settings)
        if self.refuse_connect:
            connection.connect_failed(Failure(ConnectionRefusedError("refused")))
            return connection
        connection.makeConnection(_Wire(self, connection))
        self.connections.append(connection)
        return connection

    def received(self, connection: UpstreamConnection, message: bytes) -> None:
        header = messages.peek(message)
        if header.op_tag == messages.UNBIND_REQUEST and header.message_id == PROXY_UNBIND_ID:
            self.proxy_unbinds += 1
            return
        self.requests.append(message)
        if header.op_tag == messages.BIND_REQUEST:
            request = messages.decode_bind_request(message)
            self.binds.append((request.name, request.password or b""))
        if self.auto:
            self.answer(connection, message)
        else:
            self.held.append((connection, message))

    def release(self) -> None:
        held, self.held = self.held, []
        for connection, message in held:
            self.answer(connection, message)

    def answer(self, connection: UpstreamConnection, message: bytes) -> None:
        response = self.response(message)
        if response:
            connection.dataReceived(response)

    def response(self, message: bytes) -> bytes:
        header = messages.peek(message)
        message_id, tag = header.message_id, header.op_tag
        if tag == messages.BIND_REQUEST:
            return messages.encode_bind_response(message_id, self._bind_code(message))
        if tag == messages.SEARCH_REQUEST:
            entries = b"".join(entry(message_id, i) for i in range(self.entries))
            return entries + messages.encode_result(message_id, messages.SEARCH_RESULT_DONE, 0)
        response = messages.response_for(tag)
        return messages.encode_result(message_id, response, 0) if response else b""

    def _bind_code(self, message: bytes) -> int:
        request = messages.decode_bind_request(message)
        if request.sasl_mechanism == "PLAIN":  # authzid NUL authcid NUL password
            _, authcid, secret = (request.sasl_credentials or b"\0\0").split(b"\0", 2)
            dn = f"uid={authcid.decode()},ou=people,{BASE}"
            return 0 if PASSWORDS.get(dn) == secret else 49
        password = request.password or b""
        if password in self.bind_results:
            return self.bind_results[password]
        if request.is_anonymous or PASSWORDS.get(request.name) == password:
            return 0
        return 49

    def bind_passwords(self) -> list[bytes]:
        return [password for _, password in self.binds]


# ---------------------------------------------------------------- harness


class Client:
    def __init__(self, factory: LdapProxyFactory, peer: IPv4Address = PEER) -> None:
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self._framer = framing.MessageFramer(1 << 24)
        self._next_id = 1

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def bind(self, name: str, password: bytes | str) -> int:
        raw = password.encode() if isinstance(password, str) else password
        message_id = self.next_id()
        self.send(messages.encode_bind_request(message_id, name, raw))
        return message_id

    def search(self) -> int:
        message_id = self.next_id()
        self.send(search(message_id))
        return message_id

    def responses(self) -> list[bytes]:
        data = self.transport.value()
        self.transport.clear()
        return self._framer.feed(data)

    def result(self) -> messages.LdapResult:
        (response,) = self.responses()
        return messages.decode_result(response)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


@dataclass
class Harness:
    factory: LdapProxyFactory
    core: RealCore
    directory: FakeDirectory
    clock: Clock
    events: CountingLdapEvents

    def client(self, peer: IPv4Address = PEER) -> Client:
        return Client(self.factory, peer)


def make(core: RealCore | None = None, **settings: Any) -> Harness:
    """A front-end on fakes; a new real core unless one is given (fuzzing shares one:
    a core costs a database)."""
    directory = settings.pop("directory", None) or FakeDirectory()
    config = replace(
        LdapFrontendConfig(
            upstream="ldap://127.0.0.1:389", exempt=(SVC,), idle_timeout=0, unbound_timeout=0
        ),
        **settings,
    )
    if core is None:
        core = RealCore()
        _cores.append(core)
    clock, events = Clock(), CountingLdapEvents()
    factory = LdapProxyFactory(
        config, core, events=events, reactor=clock, connect_upstream=directory.connect
    )
    return Harness(factory, core, directory, clock, events)


_cores: list[RealCore] = []


@pytest.fixture(autouse=True)
def _close_cores() -> Any:
    yield
    while _cores:
        _cores.pop().close()


# ---------------------------------------------------------------- MFA binds


def test_bind_with_password_and_code_binds_upstream_with_the_password_only() -> None:
    h = make()
    client = h.client()
    credential = h.core.good()
    client.bind(ALICE, credential)
    assert client.result().code == ResultCode.SUCCESS
    assert h.directory.binds == [(ALICE, b"alice-pw")]  # the one bind as alice: the check
    assert h.core.directory.checks == []  # the core bound nowhere itself
    (request,) = h.core.requests
    assert (request.username, request.bind_dn, request.password, request.separator) == (
        ALICE, ALICE, credential, ",")
    assert request.mfa is MfaMode.ENROLLED and request.source == "10.0.0.7"
    assert h.events[("bind", "accept", "ok")] == 1


def test_the_session_is_bound_as_the_entry_not_as_the_client_spelled_it() -> None:
    h = make()
    client = h.client()
    client.bind("UID=Alice, OU=People, DC=example, DC=org", h.core.good())
    assert client.result().code == ResultCode.SUCCESS
    assert h.directory.binds == [(ALICE, b"alice-pw")]


@pytest.mark.parametrize(("password", "checked"), [
    ("alice-pw,654321", "alice-pw"), ("alice-pw", "alice-pw"), ("alice-pw,", "alice-pw,"),
    ("wrong,123456", "wrong")])
def test_a_failing_code_never_binds_the_session_and_reads_as_a_wrong_password(
        password: str, checked: str) -> None:
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.bind(ALICE, password)
    assert h.directory.binds == []  # the session is never bound on the password alone
    assert h.core.directory.checks == [("alice", checked)]  # the core's own check
    result = client.result()
    # the core's text, the same for a bad password and a bad or missing code
    assert (result.code, result.diagnostic) == (49, CREDENTIALS)
    assert h.core.failures("alice") == 1 and h.core.turns_held == 0


def test_a_wrong_password_with_a_right_code_is_the_session_bind_then_a_reset() -> None:
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.bind(ALICE, "wrong," + h.core.code())
    assert h.directory.binds == [(ALICE, b"wrong")]  # the password check: the code split off
    h.directory.release()
    assert h.directory.binds == [(ALICE, b"wrong"), ("", b"")]  # then the reset
    assert client.responses() == []  # the answer waits for it
    h.directory.release()
    result = client.result()
    assert (result.code, result.diagnostic) == (49, CREDENTIALS)
    assert h.core.failures("alice") == 1 and h.core.turns_held == 0
    assert h.core.directory.checks == []


def test_a_failed_bind_after_a_success_resets_the_session_before_answering() -> None:
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.bind(ALICE, h.core.good())
    h.directory.release()
    assert client.result().code == 0
    client.bind(ALICE, "alice-pw,000000")  # wrong code: the core checks the password
    assert h.directory.bind_passwords() == [b"alice-pw", b""]  # alice's until the reset
    assert client.responses() == []  # no answer until the reset is done
    h.directory.release()
    assert client.result().code == 49
    assert not client.closed


def test_after_a_session_bind_every_failure_is_followed_by_one_reset() -> None:
    """Conservative: once a bind went upstream, only a successful anonymous bind
    makes the session count as anonymous again."""
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert client.result().code == 0
    client.bind(ALICE, "nope," + h.core.code())
    assert client.result().code == 49
    assert h.directory.bind_passwords() == [b"alice-pw", b"nope", b""]
    client.bind(ALICE, "")  # refused locally (53): the reset held, no second one
    assert client.result().code == 53
    assert h.directory.bind_passwords() == [b"alice-pw", b"nope", b""]


def test_a_refusal_before_any_upstream_bind_needs_no_reset() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, "")
    assert client.result().code == 53
    client.bind(f"uid=nobody,ou=people,{BASE}", "nope,123456")  # refused before any check
    assert client.result().code == 49
    assert h.directory.binds == []


def test_failed_reset_closes_both_connections_without_answering_the_bind() -> None:
    h = make(directory=FakeDirectory(bind_results={b"": 52}))
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    client.bind(ALICE, "alice-pw,000000")
    (notice,) = client.responses()  # no BindResponse: the session may still be alice's
    assert messages.peek(notice).message_id == 0
    assert messages.extended_response_name(notice) == messages.NOTICE_OF_DISCONNECTION_OID
    assert client.closed
    assert h.directory.connections[0].transport.disconnecting
    assert h.events[("upstream_error", "reset_failed")] == 1
    assert h.events[("dropped", "reset_failed")] == 1
    assert h.events[("bind", "reject", "bad_code")] == 1


def test_a_new_bind_after_success_that_fails_leaves_the_session_anonymous() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    client.bind(BOB, "wrong," + h.core.code("bob"))
    assert client.result().code == 49
    assert h.directory.bind_passwords() == [b"alice-pw", b"wrong", b""]  # then reset


def test_failed_bind_after_a_success_resets_even_a_local_refusal() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    client.bind(ALICE, "")  # refused locally (53), but alice is still bound upstream
    assert client.result().code == 53
    assert h.directory.bind_passwords() == [b"alice-pw", b""]


def test_locked_user_is_refused_without_a_password_check() -> None:
    h = make()
    h.core.lock("alice")
    client = h.client()
    client.bind(ALICE, h.core.good())
    result = client.result()
    assert result.code == 49 and result.diagnostic.startswith("locked")
    assert h.directory.binds == [] and h.core.directory.checks == []


def test_expired_enrollment() -> None:
    h = make()
    h.core.expire("alice")
    client = h.client()
    client.bind(ALICE, "alice-pw")
    result = client.result()
    assert result.code == 49 and result.diagnostic.startswith("enrollment expired")
    assert h.directory.binds == []  # refused whatever the password: the core checked it
    assert h.core.directory.checks == [("alice", "alice-pw")]


def test_user_in_enrollment_passes_with_password_and_is_told_the_days_left() -> None:
    h = make()
    h.core.enrolling("alice", 3)
    client = h.client()
    client.bind(ALICE, "alice-pw")
    result = client.result()
    assert result.code == 0
    assert "3 days left" in result.diagnostic
    assert h.events[("bind", "accept", "in_enrollment")] == 1


def test_ad_style_bind_name_is_resolved_through_the_user_filter() -> None:
    h = make()
    client = h.client()
    client.bind("alice@example.org", h.core.good())
    assert client.result().code == 0
    (request,) = h.core.requests
    assert (request.username, request.bind_dn) == ("alice@example.org", None)
    assert h.directory.binds == [(ALICE, b"alice-pw")]  # the entry's DN


def test_a_dn_that_names_no_entry_is_refused_and_leaves_no_state() -> None:
    h = make()
    client = h.client()
    for dn in ("uid=nobody,ou=people,dc=example,dc=org", "cn=admin,dc=example,dc=org",
               "uid;x=alice,ou=people,dc=example,dc=org"):
        client.bind(dn, "whatever-pw")
        assert client.result().code == 49
    assert h.core.store.admin.list_users() == [] or {u.username for u in
                                                     h.core.store.admin.list_users()} == set(USERS)
    assert h.directory.binds == []


def test_directory_unavailable_during_the_check_answers_52() -> None:
    h = make()
    h.core.directory.down = True
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert client.result().code == 52
    assert h.core.failures("alice") == 0


def test_the_directory_s_answer_to_the_password_check_is_the_verdict() -> None:
    h = make(directory=FakeDirectory(bind_results={b"alice-pw": 49}))
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert client.result().code == 49
    assert h.core.failures("alice") == 1  # a refusal counts
    h = make(directory=FakeDirectory(bind_results={b"alice-pw": 52}))
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert client.result().code == 52
    assert h.core.failures("alice") == 0  # the directory's trouble does not
    h.core.engine.audit.flush()
    assert [r.reason for r in h.core.store.admin.recent_audit("alice")] == [
        "directory_unavailable"]


def test_the_client_gone_mid_check_gives_the_identity_s_turn_back() -> None:
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert h.directory.binds == [(ALICE, b"alice-pw")] and h.core.turns_held == 1
    client.protocol.connectionLost(Failure(ConnectionError()))
    assert h.core.turns_held == 0
    h.core.engine.audit.flush()
    assert [r.reason for r in h.core.store.admin.recent_audit("alice")] == [
        "directory_unavailable"]
    again = h.client()  # alice's next attempt is not kept waiting
    again.bind(ALICE, h.core.good())
    assert h.directory.binds[-1] == (ALICE, b"alice-pw")


def test_bind_controls_are_kept_on_the_upstream_bind() -> None:
    h = make()
    client = h.client()
    control = ber.tlv(messages.CONTROLS, ber.tlv(0x30, ber.tlv(0x04, b"1.3.6.1.4.1.42.2.27.8.5.1")))
    body = ber.integer(3) + ber.tlv(0x04, ALICE.encode()) + ber.tlv(0x80, h.core.good().encode())
    client.send(messages.ldap_message(5, ber.tlv(messages.BIND_REQUEST, body), control))
    assert client.result().code == 0
    upstream_bind = [
        m for m in h.directory.requests if messages.peek(m).op_tag == messages.BIND_REQUEST
    ]
    assert upstream_bind[0].endswith(control)


def test_bind_timeout_answers_52_and_closes_when_a_bind_is_in_flight() -> None:
    h = make(directory=FakeDirectory(auto=False), bind_timeout=5)
    client = h.client()
    client.bind(ALICE, h.core.good())
    h.clock.advance(5)
    responses = client.responses()
    assert messages.decode_result(responses[0]).code == 52
    assert client.closed


# ---------------------------------------------------------------- other binds


def test_empty_password_is_unwilling_to_perform_without_going_upstream() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, "")
    assert client.result().code == 53
    assert h.directory.binds == [] and h.core.requests == []


def sasl_bind(message_id: int, name: str, mechanism: bytes, credentials: bytes | None) -> bytes:
    sasl = ber.tlv(0x04, mechanism)
    if credentials is not None:
        sasl += ber.tlv(0x04, credentials)
    body = ber.integer(3) + ber.tlv(0x04, name.encode()) + ber.tlv(0xA3, sasl)
    return messages.ldap_message(message_id, ber.tlv(messages.BIND_REQUEST, body))


@pytest.mark.parametrize("name", [ALICE, SVC, ""])
def test_sasl_is_refused_whatever_the_bind_name(name: str) -> None:
    """The attack: PLAIN names its own identity; an exempt bind name must not carry it."""
    h = make()
    client = h.client()
    client.send(sasl_bind(2, name, b"PLAIN", b"\0alice\0alice-pw"))
    assert client.result().code == 7
    assert h.directory.requests == []
    assert h.events[("bind", "reject", "sasl_not_supported")] == 1


def test_sasl_after_a_successful_bind_is_refused_and_resets_the_session() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    client.send(sasl_bind(20, SVC, b"PLAIN", b"\0bob\0bob-pw"))
    assert client.result().code == 7
    assert h.directory.bind_passwords() == [b"alice-pw", b""]


def test_sasl_passthrough_relays_the_bind_as_it_is() -> None:
    h = make(sasl_passthrough=True)
    client = h.client()
    message = sasl_bind(2, "", b"PLAIN", b"\0alice\0alice-pw")
    client.send(message)
    assert client.result().code == 0  # the fake directory accepts it
    assert h.directory.requests == [message]
    assert h.events[("bind", "accept", "sasl_passthrough")] == 1
    assert h.core.requests == []  # no MFA: that is what the option says


def test_anonymous_bind_refused_unless_allowed() -> None:
    h = make()
    client = h.client()
    client.bind("", "")
    assert client.result().code == 48
    assert h.directory.binds == []
    h = make(allow_anonymous=True)
    client = h.client()
    client.bind("", "")
    assert client.result().code == 0
    assert h.directory.binds == [("", b"")]


def test_exempt_bind_is_forwarded_byte_for_byte() -> None:
    h = make()
    client = h.client()
    message = messages.encode_bind_request(
        9, "CN=svc, OU=services, DC=example, DC=org", b"svc-secret"
    )
    client.send(message)
    assert h.directory.requests[0] == message  # as sent, spelling and all
    client.responses()
    h2 = make()
    other = h2.client()
    other.bind(SVC, "svc-secret")
    assert other.result().code == 0
    assert h2.core.requests == []
    assert h2.events[("bind", "accept", "exempt")] == 1


def test_exempt_bind_with_wrong_password() -> None:
    h = make()
    client = h.client()
    client.bind(SVC, "nope")
    assert client.result().code == 49
    assert h.events[("bind", "reject", "bad_password")] == 1


def test_ldapv2_bind_is_a_protocol_error() -> None:
    h = make()
    client = h.client()
    body = ber.integer(2) + ber.tlv(0x04, ALICE.encode()) + ber.tlv(0x80, b"x")
    client.send(messages.ldap_message(2, ber.tlv(messages.BIND_REQUEST, body)))
    assert client.result().code == ResultCode.PROTOCOL_ERROR


# ---------------------------------------------------------------- forwarding


def test_requests_and_responses_are_forwarded_unchanged() -> None:
    h = make(require_bind=False)
    client = h.client()
    message = search(77)
    client.send(message)
    assert h.directory.requests == [message]
    responses = client.responses()
    assert responses == framing.MessageFramer(1 << 20).feed(h.directory.response(message))
    assert [messages.peek(r).message_id for r in responses] == [77] * 4
    assert h.events[("forwarded", "search")] == 1


def test_pipelined_requests_in_one_segment_and_split_responses() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    sent = [search(i) for i in range(2, 12)]
    client.send(b"".join(sent))
    assert h.directory.requests == sent
    stream = b"".join(h.directory.response(m) for _, m in h.directory.held)
    connection = h.directory.connections[0]
    for start in range(0, len(stream), 7):
        connection.dataReceived(stream[start : start + 7])
    assert b"".join(client.responses()) == stream


def test_messages_sent_during_a_bind_wait_for_it() -> None:
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.search()
    assert len(h.directory.requests) == 1  # only the bind went upstream
    assert client.transport.producerState == "paused"
    h.directory.release()
    assert messages.decode_result(client.responses()[0]).code == 0
    assert len(h.directory.requests) == 2  # now the search
    assert client.transport.producerState == "producing"


def test_messages_wait_for_the_upstream_connection() -> None:
    directory = FakeDirectory()
    pending: list[UpstreamConnection] = []

    def slow_connect(reactor: Any, settings: UpstreamSettings, owner: UpstreamOwner) -> Any:
        connection = UpstreamConnection(owner, settings)
        pending.append(connection)
        return connection

    h = make(require_bind=False, directory=directory)
    h.factory.connect_upstream = slow_connect
    client = h.client()
    client.search()
    assert directory.requests == []
    connection = pending[0]
    connection.makeConnection(_Wire(directory, connection))
    assert len(directory.requests) == 1
    assert len(client.responses()) == 4


def test_unbind_is_forwarded_and_closes() -> None:
    h = make()
    client = h.client()
    client.send(messages.ldap_message(3, b"\x42\x00"))
    assert h.directory.requests == [messages.ldap_message(3, b"\x42\x00")]
    assert client.closed


def test_abandon_is_forwarded_and_clears_the_outstanding_operation() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(search(5))
    client.send(messages.ldap_message(6, ber.integer(5, messages.ABANDON_REQUEST)))
    assert len(h.directory.requests) == 2
    protocol = client.protocol
    assert isinstance(protocol, LdapProxyProtocol)
    assert not protocol.session.outstanding


def test_upstream_notice_of_disconnection_is_relayed_once() -> None:
    h = make()
    client = h.client()
    notice = messages.encode_notice_of_disconnection(52, "shutting down")
    connection = h.directory.connections[0]
    connection.dataReceived(notice)
    connection.connectionLost(Failure(ConnectionError()))
    assert client.responses() == [notice]
    assert client.closed


# ---------------------------------------------------------------- require_bind


def test_operations_before_any_bind_are_refused_by_default() -> None:
    h = make()  # require_bind unset: on, since allow_anonymous is off
    client = h.client()
    message_id = client.search()
    (response,) = client.responses()
    assert messages.peek_id_and_tag(response) == (message_id, messages.SEARCH_RESULT_DONE)
    assert messages.decode_result(response) == (50, "", "bind required")
    assert h.directory.requests == []  # nothing reached the directory anonymously
    assert h.events[("refused", "search", "bind_required")] == 1
    assert h.factory.config.requires_bind is True


def test_require_bind_defaults_off_with_allow_anonymous() -> None:
    assert LdapFrontendConfig().requires_bind is True
    assert LdapFrontendConfig(allow_anonymous=True).requires_bind is False
    assert LdapFrontendConfig(allow_anonymous=True, require_bind=True).requires_bind is True
    assert LdapFrontendConfig(require_bind=False).requires_bind is False
    h = make(allow_anonymous=True)
    client = h.client()
    client.search()
    assert len(client.responses()) == 4  # forwarded, as anonymous binds are allowed


def test_require_bind_refuses_operations_before_a_bind() -> None:
    h = make(require_bind=True)
    client = h.client()
    message_id = client.search()
    (response,) = client.responses()
    header = messages.peek(response)
    assert (header.message_id, header.op_tag) == (message_id, messages.SEARCH_RESULT_DONE)
    assert messages.decode_result(response).code == 50
    client.send(messages.encode_extended_request(9, messages.WHO_AM_I_OID))
    assert messages.peek_id_and_tag(client.responses()[0]) == (9, messages.EXTENDED_RESPONSE)
    assert h.directory.requests == []
    client.bind(ALICE, h.core.good())
    client.responses()
    client.search()
    assert len(client.responses()) == 4


def test_require_bind_after_a_failed_bind() -> None:
    h = make(require_bind=True)
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    client.bind(ALICE, "alice-pw,000000")
    client.responses()
    client.search()
    assert messages.decode_result(client.responses()[0]).code == 50


@pytest.mark.parametrize("password", ["alice-pw,000000", "wrong,123456", ""])
def test_operations_after_a_failed_first_bind_are_refused_by_default(password: str) -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, password)
    assert client.result().code != 0
    forwarded = len(h.directory.requests)
    client.search()
    client.send(messages.encode_extended_request(40, messages.WHO_AM_I_OID))
    assert [messages.decode_result(r).code for r in client.responses()] == [50, 50]
    assert len(h.directory.requests) == forwarded


# ---------------------------------------------------------------- message IDs and sequencing


def assert_closed_for_reuse(h: Harness, client: Client) -> None:
    notice = client.responses()[-1]
    assert messages.peek(notice).message_id == 0
    assert messages.extended_response_name(notice) == messages.NOTICE_OF_DISCONNECTION_OID
    assert messages.decode_result(notice).code == ResultCode.PROTOCOL_ERROR
    assert client.closed
    assert all(c.transport.disconnecting for c in h.directory.connections)
    assert h.events[("dropped", "message_id_reused")] == 1


def test_attack_unknown_extended_op_and_bind_with_one_id_in_one_segment() -> None:
    """The directory's protocolError for the extended operation must not be taken
    for the answer to the proxy's bind (which then skipped the reset and relayed
    the directory's real bind success): the reused ID ends the session."""
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(
        messages.encode_extended_request(5, UNKNOWN_OID)
        + messages.encode_bind_request(5, ALICE, b"alice-pw,000000")
    )
    assert_closed_for_reuse(h, client)
    assert h.directory.binds == []  # the bind never went upstream
    assert h.core.requests == []


def test_attack_whoami_and_wrong_password_bind_with_one_id() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    wrong = b"wrong,123456"
    client.send(whoami(7) + messages.encode_bind_request(7, ALICE, wrong))
    assert_closed_for_reuse(h, client)
    assert h.directory.binds == []


def test_reusing_the_id_of_a_bind_in_progress_closes_the_session() -> None:
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(messages.encode_bind_request(3, ALICE, h.core.good().encode()) + whoami(3))
    assert_closed_for_reuse(h, client)


def test_reusing_the_id_of_a_forwarded_search_in_a_later_segment_closes_the_session() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(search(4))
    client.send(search(4))
    assert_closed_for_reuse(h, client)
    assert len(h.directory.requests) == 1


def test_an_id_may_be_used_again_once_answered() -> None:
    h = make()
    client = h.client()
    client.send(messages.encode_bind_request(4, ALICE, h.core.good().encode()))
    assert client.result().code == 0
    client.send(search(4))
    assert len(client.responses()) == 4
    client.send(search(4))
    assert len(client.responses()) == 4
    client.send(messages.encode_bind_request(4, ALICE, h.core.good().encode()))
    assert client.result().code == 0
    assert not client.closed


def test_an_id_refused_locally_is_free_again() -> None:
    h = make()
    client = h.client()
    client.send(search(6))  # refused: bind required
    assert client.result().code == 50
    client.send(messages.encode_bind_request(6, ALICE, h.core.good().encode()))
    assert client.result().code == 0


@pytest.mark.parametrize(
    ("message_id", "reason"), [(0, "protocol_error"), (messages.MAX_MESSAGE_ID + 1, "malformed")]
)
def test_message_id_out_of_range_is_a_protocol_error(message_id: int, reason: str) -> None:
    h = make(require_bind=False)
    client = h.client()
    client.send(search(message_id))
    (notice,) = client.responses()
    assert messages.decode_result(notice).code == ResultCode.PROTOCOL_ERROR
    assert client.closed
    assert h.directory.requests == []
    assert h.events[("dropped", reason)] == 1


def test_abandon_frees_the_id_of_the_operation_it_abandons() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(search(5))
    client.send(messages.ldap_message(6, ber.integer(5, messages.ABANDON_REQUEST)))
    client.send(search(5))
    assert not client.closed
    assert len(h.directory.requests) == 3


def test_an_abandon_reusing_an_outstanding_id_closes_the_session() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(search(5))
    client.send(messages.ldap_message(5, ber.integer(9, messages.ABANDON_REQUEST)))
    assert_closed_for_reuse(h, client)


def test_a_bind_waits_for_outstanding_operations() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    credential = h.core.good().encode()
    client.send(search(2) + whoami(3) + messages.encode_bind_request(4, ALICE, credential))
    assert h.directory.binds == []  # two operations still running
    connection, first = h.directory.held.pop(0)
    h.directory.answer(connection, first)
    assert h.directory.binds == []  # one still running
    h.directory.release()  # the whoami's answer: now the bind goes upstream
    assert h.directory.binds == [(ALICE, b"alice-pw")]
    h.directory.release()
    responses = client.responses()
    assert [messages.peek(r).message_id for r in responses] == [2, 2, 2, 2, 3, 4]
    assert messages.decode_result(responses[-1]).code == 0


def test_a_bind_waiting_longer_than_bind_timeout_gets_52_and_closes() -> None:
    h = make(require_bind=False, bind_timeout=5, directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(search(2) + messages.encode_bind_request(3, ALICE, h.core.good().encode()))
    h.clock.advance(5)
    bind_response, notice = client.responses()
    assert messages.peek_id_and_tag(bind_response) == (3, messages.BIND_RESPONSE)
    assert messages.decode_result(bind_response).code == 52
    assert messages.peek(notice).message_id == 0
    assert client.closed
    assert h.directory.binds == []
    assert h.events[("dropped", "bind_wait_timeout")] == 1
    assert h.events[("bind", "reject", "operations_outstanding")] == 1


def test_nothing_is_forwarded_between_the_upstream_bind_and_the_bind_answer() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    credential = h.core.good().encode()
    client.send(messages.encode_bind_request(2, ALICE, credential) + search(3) + whoami(4))
    assert h.directory.bind_passwords() == [b"alice-pw"]  # both factors passed: the session
    assert len(h.directory.requests) == 1  # and nothing else yet
    assert client.responses() == []
    h.directory.release()  # the session bind is answered: the client hears 0, then the rest
    responses = client.responses()
    assert messages.peek_id_and_tag(responses[0]) == (2, messages.BIND_RESPONSE)
    assert messages.decode_result(responses[0]).code == 0
    assert len(h.directory.requests) == 3
    h.directory.release()
    assert [messages.peek(r).message_id for r in client.responses()] == [3, 3, 3, 3, 4]


def test_a_failed_bind_after_a_success_holds_everything_until_the_reset() -> None:
    h = make(require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.bind(ALICE, h.core.good())
    h.directory.release()
    client.responses()
    client.send(
        messages.encode_bind_request(5, ALICE, b"alice-pw,000000") + search(6) + whoami(7)
    )
    assert h.directory.bind_passwords() == [b"alice-pw", b""]  # the reset only
    requests = len(h.directory.requests)
    assert client.responses() == []
    h.directory.release()  # the reset holds: the client hears 49, then the rest goes
    responses = client.responses()
    assert messages.peek_id_and_tag(responses[0]) == (5, messages.BIND_RESPONSE)
    assert messages.decode_result(responses[0]).code == 49
    assert len(h.directory.requests) == requests + 2


def test_an_injected_bind_answered_with_another_response_type_closes_both() -> None:
    """Invariant 3: only a BindResponse answers the proxy's bind."""
    h = make(directory=FakeDirectory(auto=False))
    client = h.client()
    client.send(messages.encode_bind_request(5, ALICE, h.core.good().encode()))
    connection, _ = h.directory.held.pop()
    connection.dataReceived(messages.encode_extended_response(5, ResultCode.PROTOCOL_ERROR))
    (notice,) = client.responses()
    assert messages.peek(notice).message_id == 0
    assert client.closed and connection.transport.disconnecting
    assert h.events[("upstream_error", "protocol_violation")] == 1
    assert h.events[("dropped", "upstream_protocol_violation")] == 1
    connection.dataReceived(messages.encode_bind_response(5, 0))  # the real answer, too late
    assert client.responses() == []


def test_a_bind_response_nobody_asked_for_closes_both() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    h.directory.connections[0].dataReceived(messages.encode_bind_response(9, 0))
    (notice,) = client.responses()
    assert messages.peek(notice).message_id == 0
    assert client.closed
    assert h.events[("dropped", "upstream_protocol_violation")] == 1


def test_a_late_accept_after_the_answer_binds_nothing() -> None:
    """A decision that comes after its bind was answered (timed out) must not
    bind the session behind the client's back."""
    h = make(bind_timeout=5)
    pending: list[Deferred[Decision]] = []

    def slow_core(request: Any) -> Deferred[Decision]:
        pending.append(Deferred())
        return pending[-1]

    h.factory.start_sign_in = slow_core
    client = h.client()
    client.bind(ALICE, "alice-pw,123456")
    h.clock.advance(5)
    assert messages.decode_result(client.responses()[0]).code == 52
    assert client.closed  # a timed-out bind ends the session
    late = Decision(Outcome.ACCEPT, Reason.OK, "alice", Identity("alice", ALICE))
    pending[0].callback(late)  # ignored: it was cancelled
    assert h.directory.binds == []


class HeldLookups(MemoryDirectory):
    """The core's look-ups wait until ``release()``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[Identity | None], str]] = []

    def lookup(self, username: str) -> Deferred[Identity | None]:
        d: Deferred[Identity | None] = Deferred()
        self.held.append((d, username))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, username in held:
            MemoryDirectory.lookup(self, username).chainDeferred(d)


def test_a_password_check_the_core_hands_back_after_a_timeout_is_given_back() -> None:
    core = RealCore(HeldLookups())
    _cores.append(core)
    h = make(core, bind_timeout=5)
    client = h.client()
    client.bind(ALICE, h.core.good())
    h.clock.advance(5)  # start is cancelled while the entry is looked up
    assert messages.decode_result(client.responses()[0]).code == 52 and client.closed
    assert core.turns_held == 0  # not at the gate yet
    core.directory.release()  # the core goes on: its check finds nobody waiting
    assert core.turns_held == 0  # ... and is abandoned, never handed out
    assert core.checks == []
    assert h.directory.binds == []
    core.engine.audit.flush()
    assert [r.reason for r in core.store.admin.recent_audit("alice")] == [
        "directory_unavailable"]


# ---------------------------------------------------------------- sequencing, as a property


@dataclass
class TrackingDirectory(FakeDirectory):
    """A directory that checks the proxy's sequencing as it goes.

    Worse than slapd on purpose: a failed bind leaves the session as it was, so
    only the proxy's reset makes it anonymous. It honours abandon (drops a held
    operation) and answers WhoAmI with the session's identity. ``told`` says
    who the client was last told it is; every operation that reaches the
    directory must run as exactly that identity.
    """

    auto: bool = False
    identity: str = ""
    at_directory: set[int] = field(default_factory=set)  # sent and not yet answered
    violations: list[str] = field(default_factory=list)
    told: Any = None  # () -> str

    def received(self, connection: UpstreamConnection, message: bytes) -> None:
        header = messages.peek(message)
        tag, message_id = header.op_tag, header.message_id
        if tag == messages.UNBIND_REQUEST:
            return
        if tag == messages.ABANDON_REQUEST:
            target = messages.abandoned_message_id(message, header)
            for held in list(self.held):
                held_header = messages.peek(held[1])
                if held_header.message_id == target and held_header.op_tag != messages.BIND_REQUEST:
                    self.held.remove(held)
                    self.at_directory.discard(target)
            return
        if message_id in self.at_directory:
            self.violations.append(f"ID {message_id} sent while outstanding at the directory")
        self.at_directory.add(message_id)
        if tag != messages.BIND_REQUEST and self.told is not None and self.told() != self.identity:
            self.violations.append(
                f"{messages.OPERATION_NAMES[tag]} {message_id} ran as {self.identity!r}, "
                f"the client was told {self.told()!r}"
            )
        super().received(connection, message)

    def release_some(self, picks: list[int]) -> None:
        """Answer held requests in any order (a directory runs them concurrently)."""
        for pick in picks:
            if not self.held:
                return
            connection, message = self.held.pop(pick % len(self.held))
            self.answer(connection, message)

    def answer(self, connection: UpstreamConnection, message: bytes) -> None:
        header = messages.peek(message)
        self.at_directory.discard(header.message_id)
        if header.op_tag == messages.BIND_REQUEST and self._bind_code(message) == 0:
            self.identity = messages.decode_bind_request(message).name
        super().answer(connection, message)

    def response(self, message: bytes) -> bytes:
        header = messages.peek(message)
        if header.op_tag == messages.EXTENDED_REQUEST:
            if messages.extended_request_name(message, header) == messages.WHO_AM_I_OID:
                value = ber.tlv(0x8B, f"dn:{self.identity}".encode() if self.identity else b"")
                return messages.encode_result(
                    header.message_id, messages.EXTENDED_RESPONSE, 0, extra=value
                )
            return messages.encode_extended_response(header.message_id, ResultCode.PROTOCOL_ERROR)
        return super().response(message)


SEQ_BINDS = {
    "bind_good": "",  # a fresh code from the sequencing core, at each send
    "bind_wrong_code": "alice-pw,000000",
    "bind_no_code": "alice-pw",
    "bind_wrong_password": "nope,123456",
}
_SEQ_CORE: list[RealCore] = []


def seq_core() -> RealCore:
    """One real core for every example (a core costs a database); it never locks,
    so the model can tell what a bind with password and code gives."""
    if not _SEQ_CORE:
        _SEQ_CORE.append(RealCore(max_failures=10**9))
    return _SEQ_CORE[0]


@pytest.fixture(scope="module", autouse=True)
def _close_the_sequencing_core() -> Any:
    yield
    while _SEQ_CORE:
        _SEQ_CORE.pop().close()
SEQ_KINDS = ("search", "whoami", "unknown_extended", *SEQ_BINDS, "abandon")


def seq_message(kind: str, message_id: int, target: int) -> bytes:
    if kind == "search":
        return search(message_id)
    if kind == "whoami":
        return whoami(message_id)
    if kind == "unknown_extended":
        return messages.encode_extended_request(message_id, UNKNOWN_OID)
    if kind == "abandon":
        return abandon(message_id, target)
    credential = seq_core().good() if kind == "bind_good" else SEQ_BINDS[kind]
    return messages.encode_bind_request(message_id, ALICE, credential.encode())


def authz_value(response: bytes) -> str | None:
    """A successful WhoAmI's authzId; None for any other response."""
    header = messages.peek(response)
    if messages.decode_result(response).code != 0:
        return None
    pos = header.op_start
    for _ in range(3):
        _, _, pos = ber.read_header(response, pos, header.op_end)
    if pos < header.op_end:
        tag, start, stop = ber.read_header(response, pos, header.op_end)
        if tag == 0x8B:
            return response[start:stop].decode()
    return None


seq_op = st.tuples(st.sampled_from(SEQ_KINDS), st.integers(1, 4), st.integers(1, 4))
seq_step = st.one_of(
    st.tuples(st.just("send"), st.lists(seq_op, min_size=1, max_size=4)),
    st.tuples(st.just("release"), st.lists(st.integers(0, 5), max_size=6)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(seq_step, min_size=1, max_size=8))
def test_sequencing_invariants_hold_for_any_interleaving(steps: list[tuple[str, Any]]) -> None:
    """Random segments, directory answers in random order: the directory never sees
    an ID twice at once, never runs an operation as anyone but who the client was
    last told it is (so never as alice after a failed bind, nor between the
    proxy's bind and its answer), a WhoAmI answers as of the last bind sent
    before it, a bind succeeds only with password and code, the session
    closes exactly when an ID still in use is reused, and the core holds no
    identity's turn once the session closed or everything was answered."""
    directory = TrackingDirectory()
    h = make(seq_core(), require_bind=False, directory=directory)
    client = h.client()
    framer = framing.MessageFramer(1 << 24)
    seen: list[bytes] = []  # everything the client got, never cleared
    sent_kind: dict[int, str] = {}
    whoami_expects: dict[int, str] = {}
    last_bind = ""  # the kind of the last bind sent
    in_use: set[int] = set()  # from the client's side: sent, final answer not yet read
    exact = True  # no abandon yet: the model knows exactly which IDs are in use

    def read() -> None:  # runs inside the proxy too (told): records, never raises
        for message in framer.feed(client.transport.value()[sum(map(len, seen)) :]):
            seen.append(message)
            message_id, tag = messages.peek_id_and_tag(message)
            passed = tag == messages.BIND_RESPONSE and messages.decode_result(message).code == 0
            if passed and sent_kind[message_id] != "bind_good":
                directory.violations.append(f"{sent_kind[message_id]} {message_id} passed")
            if tag == messages.EXTENDED_RESPONSE and message_id in whoami_expects:
                value = authz_value(message)
                if value is not None and value != whoami_expects[message_id]:
                    directory.violations.append(f"WhoAmI {message_id} said {value!r}")
            if tag in messages.FINAL_RESPONSES:
                in_use.discard(message_id)

    def told() -> str:
        read()
        binds = [m for m in seen if messages.peek(m).op_tag == messages.BIND_RESPONSE]
        return ALICE if binds and messages.decode_result(binds[-1]).code == 0 else ""

    directory.told = told
    for action, argument in steps:
        if action == "release":
            directory.release_some(argument)
        else:
            read()
            reused = False
            taken = set(in_use)
            for kind, message_id, _target in argument:
                reused = reused or message_id in taken
                if kind != "abandon":
                    taken.add(message_id)
                    sent_kind[message_id] = kind
                whoami_expects.pop(message_id, None)
                if kind in SEQ_BINDS:
                    last_bind = kind
                elif kind == "whoami":
                    whoami_expects[message_id] = (
                        f"dn:{ALICE}" if last_bind == "bind_good" else ""
                    )
            exact = exact and not any(kind == "abandon" for kind, _, _ in argument)
            in_use |= taken
            client.send(b"".join(seq_message(*op) for op in argument))
            if exact:
                assert client.closed == reused, (argument, in_use)
        read()
        assert directory.violations == []
        assert h.events[("dropped", "internal_error")] == 0
        if client.closed:
            assert seq_core().turns_held == 0  # a password check held was given back
            return
    for _ in range(20):  # let everything finish
        directory.release_some([0] * 100)
    read()
    assert directory.violations == []
    assert h.events[("dropped", "internal_error")] == 0
    assert directory.identity == told()
    assert seq_core().turns_held == 0


# ---------------------------------------------------------------- limits and errors


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x31\x03\x02\x01\x01", "malformed"),
        (ber.tlv(0x30, b"\x02\x01\x01\x61\x00"), "malformed"),  # a response from a client
        (ber.tlv(0x30, b"\x02\x01\x01\x60\x03\x02\x01\x03"), "malformed"),  # truncated bind
        (b"\x30\x84\x00\x10\x00\x00", "oversize"),
    ],
)
def test_malformed_or_oversized_message_gets_a_notice_and_a_close(data: bytes, reason: str) -> None:
    h = make(max_message_size=4096)
    client = h.client()
    client.send(data)
    (notice,) = client.responses()
    assert messages.extended_response_name(notice) == messages.NOTICE_OF_DISCONNECTION_OID
    assert messages.decode_result(notice).code == ResultCode.PROTOCOL_ERROR
    assert client.closed
    assert h.events[("dropped", reason)] == 1
    client.send(search(3))  # nothing more is read
    assert client.responses() == []


def test_other_connections_are_not_affected_by_a_malformed_one() -> None:
    h = make()
    bad, good_client = h.client(), h.client()
    bad.send(b"garbage!")
    good_client.bind(ALICE, h.core.good())
    assert good_client.result().code == 0


def test_max_connections() -> None:
    h = make(max_connections=2)
    h.client(), h.client()
    third = h.client()
    (notice,) = third.responses()
    assert messages.decode_result(notice).code == ResultCode.BUSY
    assert third.closed
    assert h.events[("dropped", "max_connections")] == 1


def test_max_connections_per_source() -> None:
    h = make(max_connections_per_source=2)
    flooder = IPv4Address("TCP", "10.0.0.66", 1)
    first, _ = h.client(flooder), h.client(flooder)
    third = h.client(flooder)
    (notice,) = third.responses()
    assert messages.decode_result(notice).code == ResultCode.BUSY
    assert third.closed
    assert h.events[("dropped", "max_connections_per_source")] == 1
    other = h.client()  # another address is not affected
    other.bind(ALICE, h.core.good())
    assert other.result().code == 0
    first.protocol.connectionLost(Failure(ConnectionError()))
    again = h.client(flooder)  # a closed connection frees its slot
    assert not again.closed
    assert h.factory.sources == {"10.0.0.66": 2, "10.0.0.7": 1}


def test_unbound_timeout_closes_a_connection_that_never_binds() -> None:
    h = make(unbound_timeout=10, require_bind=False)
    idle, searching, binding = h.client(), h.client(), h.client()
    binding.bind(ALICE, h.core.good())
    binding.responses()
    for _ in range(4):  # activity does not count, only a successful bind
        h.clock.advance(2)
        searching.search()
        searching.responses()
    h.clock.advance(2)
    for client in (idle, searching):
        (notice,) = client.responses()
        assert messages.peek(notice).message_id == 0
        assert messages.decode_result(notice).code == ResultCode.ADMIN_LIMIT_EXCEEDED
        assert client.closed
    assert not binding.closed
    assert h.events[("dropped", "unbound_timeout")] == 2


def test_unbound_timeout_waits_for_a_bind_in_progress() -> None:
    h = make(unbound_timeout=10, directory=FakeDirectory(auto=False))
    ok, refused = h.client(), h.client()
    h.clock.advance(9)
    ok.bind(ALICE, h.core.good())  # its session bind waits in the directory
    hold: Deferred[None] = Deferred()
    h.core.hold = hold
    refused.bind(BOB, "bob-pw,000000")  # its decision waits in the core
    h.clock.advance(2)
    assert not ok.closed and not refused.closed  # their binds are still running
    h.directory.release()
    hold.callback(None)  # bob's password check goes upstream, then the reset
    while h.directory.held:
        h.directory.release()
    assert ok.result().code == 0 and not ok.closed
    bind_response, notice = refused.responses()
    assert messages.decode_result(bind_response).code == 49
    assert messages.peek(notice).message_id == 0 and refused.closed


def test_partial_messages_beyond_max_buffered_bytes_are_dropped() -> None:
    h = make(max_buffered_bytes=10_000, max_message_size=8_000)
    big = search(9, 6_000)
    first, second = h.client(), h.client()
    first.send(big[:-1])  # all but the last byte
    assert h.factory.buffered_bytes == len(big) - 1
    second.send(big[:5_000])  # would push the total past 10,000
    (notice,) = second.responses()
    assert messages.decode_result(notice).code == ResultCode.BUSY
    assert second.closed
    assert h.events[("dropped", "buffer_limit")] == 1
    assert isinstance(second.protocol, LdapProxyProtocol)
    assert second.protocol.session.buffered == 0  # nothing kept after the drop
    assert h.factory.buffered_bytes == len(big) - 1
    first.send(big[-1:])  # the first completes its message: its share is given back
    assert h.factory.buffered_bytes == 0
    assert not first.closed


def test_a_dropped_or_closed_connection_gives_its_buffer_back() -> None:
    h = make()
    client = h.client()
    client.send(search(9, 2_000)[:1_500])
    assert h.factory.buffered_bytes == 1_500
    client.protocol.connectionLost(Failure(ConnectionError()))
    assert h.factory.buffered_bytes == 0
    assert isinstance(client.protocol, LdapProxyProtocol)
    assert client.protocol.session.buffered == 0
    garbage = h.client()
    message = search(9, 2_000)
    garbage.send(message[:1_500])
    garbage.send(message[1_500:] + b"\x31\x00" + message[:700])  # not an LDAPMessage
    assert garbage.closed and h.events[("dropped", "malformed")] == 1
    assert h.factory.buffered_bytes == 0


def test_whole_messages_pass_even_when_the_buffer_budget_is_spent() -> None:
    """Only partial messages count: a flood of them must not lock out a client
    whose requests arrive whole (messages queued behind a bind are bounded by
    flow control: reading pauses while any wait)."""
    h = make(max_buffered_bytes=10_000, max_message_size=10_000)
    h.client().send(search(9, 9_000)[:-1])
    assert h.factory.buffered_bytes > 9_000
    client = h.client()
    bind = messages.encode_bind_request(2, ALICE, h.core.good().encode())
    client.send(bind + search(3) + search(4))
    assert not client.closed
    assert [messages.peek(r).message_id for r in client.responses()] == [2, 3, 3, 3, 3, 4, 4, 4, 4]


def test_default_limits_fit_binds_and_searches() -> None:
    config = LdapFrontendConfig()
    assert config.max_message_size == 256 * 1024
    assert config.max_connections_per_source == 64
    assert config.unbound_timeout == 10
    assert config.max_buffered_bytes == 64 * 1024 * 1024
    h = make(max_message_size=config.max_message_size)
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    client.send(search(7, 200_000))  # a search with a 200 kB filter still fits
    assert len(client.responses()) == 4


def test_idle_timeout_but_not_while_an_operation_is_outstanding() -> None:
    h = make(idle_timeout=60, require_bind=False, directory=FakeDirectory(auto=False))
    client = h.client()
    client.search()
    h.clock.advance(120)
    assert not client.closed  # the search is still running
    h.directory.release()
    client.responses()
    h.clock.advance(59)
    assert not client.closed
    h.clock.advance(61)
    (notice,) = client.responses()
    assert messages.decode_result(notice).code == ResultCode.ADMIN_LIMIT_EXCEEDED
    assert client.closed
    assert h.events[("dropped", "idle_timeout")] == 1


def test_upstream_down_binds_get_52_and_searches_too() -> None:
    h = make(require_bind=False, directory=FakeDirectory(refuse_connect=True))
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert client.result().code == 52
    message_id = client.search()
    (response,) = client.responses()
    assert messages.peek_id_and_tag(response) == (message_id, messages.SEARCH_RESULT_DONE)
    assert messages.decode_result(response).code == 52
    assert not client.closed
    assert h.events[("upstream_error", "connect_failed")] >= 1
    assert h.core.requests == []


def test_upstream_back_after_backoff() -> None:
    h = make(directory=FakeDirectory(refuse_connect=True))
    client = h.client()
    h.directory.refuse_connect = False
    client.bind(ALICE, h.core.good())
    assert client.result().code == 52  # within the backoff: not retried
    h.clock.advance(2)
    client.bind(ALICE, h.core.good())
    assert client.result().code == 0


def test_upstream_lost_after_ready_closes_the_client_with_a_notice() -> None:
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good())
    client.responses()
    h.directory.connections[0].connectionLost(Failure(ConnectionError()))
    (notice,) = client.responses()
    assert messages.decode_result(notice).code == ResultCode.UNAVAILABLE
    assert client.closed
    assert h.events[("dropped", "upstream_lost")] == 1


def test_start_tls_without_a_certificate_is_unavailable() -> None:
    h = make()
    client = h.client()
    client.send(messages.encode_extended_request(4, messages.START_TLS_OID))
    (response,) = client.responses()
    assert messages.decode_result(response).code == ResultCode.UNAVAILABLE
    assert messages.extended_response_name(response) == messages.START_TLS_OID
    assert h.directory.requests == []


def test_connection_events() -> None:
    h = make()
    client = h.client()
    assert h.events.open_connections == 1
    client.protocol.connectionLost(Failure(ConnectionError()))
    assert h.events.open_connections == 0


# ---------------------------------------------------------------- bind cache


def codes(client: Client, *credentials: str) -> list[int]:
    results = []
    for credential in credentials:
        client.bind(ALICE, credential)
        results.append(client.result().code)
    return results


def test_bind_cache_is_the_core_s_repeat_window_with_an_audit_row_each_time() -> None:
    h = make(bind_cache_seconds=60)
    credential = h.core.good()
    assert codes(h.client(), credential, credential) == [0, 0]
    assert len(h.core.requests) == 2  # each bind is a decision, cached or not
    # the password checked each time, by the session bind alone
    assert h.directory.bind_passwords() == [b"alice-pw", b"alice-pw"]
    assert h.core.directory.checks == []
    assert h.events[("bind", "accept", Reason.REPEAT.value)] == 1
    h.core.engine.audit.flush()
    assert [r.reason for r in h.core.store.admin.recent_audit("alice")] == ["repeat", "ok"]


def test_bind_cache_window_ends() -> None:
    h = make(bind_cache_seconds=60)
    credential = h.core.good()
    client = h.client()
    assert codes(client, credential) == [0]
    h.core.clock.t += 61
    assert codes(client, credential) == [49]  # a replayed code again


def test_bind_cache_is_per_address_and_per_credential() -> None:
    h = make(bind_cache_seconds=60)
    credential = h.core.good()
    assert codes(h.client(), credential) == [0]
    assert codes(h.client(IPv4Address("TCP", "10.0.0.8", 1)), credential) == [49]
    assert codes(h.client(), "alice-pw,654321") == [49]


def test_bind_cache_dropped_on_a_failed_bind_for_the_user() -> None:
    h = make(bind_cache_seconds=60)
    credential = h.core.good()
    assert codes(h.client(), credential, "alice-pw,000000", credential) == [0, 49, 49]


def test_bind_cache_never_caches_failures() -> None:
    h = make(bind_cache_seconds=60)
    assert codes(h.client(), "alice-pw,000000", "alice-pw,000000") == [49, 49]


def test_bind_cache_hit_with_a_changed_password_is_refused() -> None:
    h = make(bind_cache_seconds=60)
    credential = h.core.good()
    client = h.client()
    assert codes(client, credential) == [0]
    h.directory.bind_results[b"alice-pw"] = 49  # changed in the directory
    assert codes(client, credential) == [49]


def test_bind_cache_rules_per_dn() -> None:
    h = make(bind_cache_rules=(BindCacheRule(f"ou=people,{BASE}", 30),))
    credential = h.core.good()
    assert codes(h.client(), credential, credential) == [0, 0]
    h.core.clock.t += 31
    assert codes(h.client(), credential) == [49]
    off = make()
    credential = off.core.good()
    assert codes(off.client(), credential, credential) == [0, 49]


def test_core_decision_can_be_slow() -> None:
    h = make()
    hold: Deferred[None] = Deferred()
    h.core.hold = hold
    client = h.client()
    client.bind(ALICE, h.core.good())
    assert client.responses() == []
    hold.callback(None)
    assert client.result().code == 0


# ---------------------------------------------------------------- garbage in


_FUZZ_CORE: list[RealCore] = []


@pytest.fixture(scope="module", autouse=True)
def _close_the_fuzzing_core() -> Any:
    yield
    while _FUZZ_CORE:
        _FUZZ_CORE.pop().close()


def _assert_survives(chunks: list[bytes]) -> None:
    if not _FUZZ_CORE:
        _FUZZ_CORE.append(RealCore())
    h = make(_FUZZ_CORE[0], allow_anonymous=True)
    client = h.client()
    for chunk in chunks:
        client.send(chunk)
    for response in client.responses():
        header = messages.peek(response)  # everything the client gets is well-formed
        if header.message_id == 0:
            assert messages.decode_result(response).code != ResultCode.OTHER  # no internal error
    assert h.events.counts[("bind", "reject", "internal_error")] == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_random_bytes_never_crash_the_server(chunks: list[bytes]) -> None:
    _assert_survives(chunks)


@settings(max_examples=300, deadline=None)
@given(near_valid(), st.integers(min_value=1, max_value=40))
def test_mutated_messages_never_crash_the_server(data: bytes, chunk: int) -> None:
    _assert_survives([data[i : i + chunk] for i in range(0, len(data), chunk)])


def test_a_drain_unbinds_the_upstream_session_before_closing_it() -> None:
    """SIGTERM's drain (disconnect_all): the client gets a Notice of Disconnection;
    the directory gets an UnbindRequest, then the connection ends."""
    h = make()
    client = h.client()
    client.bind(ALICE, h.core.good("alice"))
    assert client.result().code == 0
    wire = h.directory.connections[0].transport
    h.factory.disconnect_all()
    [notice] = client.responses()
    assert messages.decode_result(notice).code == ResultCode.UNAVAILABLE
    assert h.directory.proxy_unbinds == 1
    assert wire.disconnecting and client.closed


def test_a_client_unbind_is_not_followed_by_a_second_one() -> None:
    h = make()
    client = h.client()
    client.send(messages.ldap_message(3, b"\x42\x00"))
    client.protocol.connectionLost(Failure(ConnectionError()))
    assert h.directory.requests == [messages.ldap_message(3, b"\x42\x00")]
    assert h.directory.proxy_unbinds == 0
