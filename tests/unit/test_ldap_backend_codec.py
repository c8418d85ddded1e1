"""The directory client: its BER codec, compiled filters, connection and verify() (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3.operation.search import compile_filter as ldap3_compile_filter
from ldap3.operation.search import parse_filter as ldap3_parse_filter
from pyasn1.codec.ber import encoder as pyasn1_encoder
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from backends.base import DirectoryUnavailable, Identity, InvalidCredentials, UnknownUser
from backends.ldap import Endpoint, LdapOptions, user_search_filter
from backends.ldap_async import AsyncLdapDirectory
from backends.ldap_client import ConnectionLost, LdapClientProtocol, OperationTimeout, Reply
from backends.ldapwire.ber import ENUMERATED, OCTET_STRING, SEQUENCE, SET, BerError, integer, tlv
from backends.ldapwire.filters import FilterTemplateError, compile_filter
from backends.ldapwire.framing import frame_size
from backends.ldapwire.messages import (
    BIND_REQUEST,
    BIND_RESPONSE,
    SCOPE_SUBTREE,
    SEARCH_REQUEST,
    SEARCH_RESULT_DONE,
    SEARCH_RESULT_ENTRY,
    SearchTemplate,
    UserEntryReader,
    bind_request,
    decode_entry,
    decode_envelope,
    ldap_message,
)


def ldap3_encoding(string_filter: str) -> bytes:
    """What ldap3 (pyasn1) sends for a string filter: the reference encoding."""
    node = ldap3_parse_filter(string_filter, None, True, True, None, False)
    return bytes(pyasn1_encoder.encode(ldap3_compile_filter(node.elements[0])))


TEMPLATES = [
    "(uid={username})",
    "(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))",
    "(sAMAccountName={username})",
    "(userPrincipalName={username})",
    "(uid={username}*)",
    "(cn=*{username}*x)",
    "(!(cn=a\\2ab))",
    "(cn:caseExactMatch:={username})",
    "(objectClass=*)",
    "(cn>={username})",
    "(cn<=a)",
    "(cn~={username})",
    "(cn=a*b*c)",
    "(&(uid={username})(!(pwdAccountLockedTime=*)))",
]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("username", ["alice", "a*b(c)\\d", "zoë", "", "user@realm"])
def test_compiled_filter_matches_ldap3(template: str, username: str) -> None:
    if not username and ("{username}*" in template or "*{username}" in template):
        pytest.skip("an empty username never reaches a search")
    ours = compile_filter(template).encode(username=username)
    assert ours == ldap3_encoding(user_search_filter(template, username))


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=40))
def test_any_username_encodes_like_an_escaped_string_filter(username: str) -> None:
    template = "(&(objectClass=person)(uid={username}))"
    ours = compile_filter(template).encode(username=username)
    assert ours == ldap3_encoding(user_search_filter(template, username))


def test_static_filters_are_encoded_once() -> None:
    assert compile_filter("(&(objectClass=person)(cn=x))").root.static is not None
    compiled = compile_filter("(&(objectClass=person)(uid={username}))")
    assert compiled.root.static is None and compiled.placeholders == {"username"}


def test_dn_attributes_flag() -> None:
    # ldap3 encodes BOOLEAN TRUE as 0x01; DER (and we) use 0xff. Both are valid BER.
    encoded = compile_filter("(uid:dn:2.5.13.5:={username})").encode(username="q")
    assert encoded == bytes.fromhex("a9158108322e352e31332e3582037569648301718401ff")


def test_unknown_braces_stay_literal() -> None:
    assert compile_filter("(cn={other})").encode(username="x") == ldap3_encoding("(cn={other})")


@pytest.mark.parametrize(
    "template",
    ["uid={username}", "(uid={username}", "(&)", "((uid=x))", "(u id=x)", "(uid=\\zz)",
     "(uid=x))", "(uid)", ""],
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(FilterTemplateError):
        compile_filter(template)


# ---------------------------------------------------------------- BER


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, "020100"), (3, "020103"), (127, "02017f"), (128, "02020080"), (256, "02020100"),
     (-1, "0201ff"), (0x7FFFFFFF, "02047fffffff")],
)
def test_integer(value: int, encoded: str) -> None:
    assert integer(value).hex() == encoded


def test_long_lengths() -> None:
    assert tlv(OCTET_STRING, b"x" * 200)[:3] == bytes((0x04, 0x81, 200))
    assert tlv(OCTET_STRING, b"x" * 300)[:4] == bytes((0x04, 0x82, 0x01, 0x2C))


def test_bind_request_known_answer() -> None:
    # RFC 4511 BindRequest, version 3, simple: what ldapwhoami -x -D cn=a -w b sends.
    expected = "3011" "020101" "600c" "020103" "0404636e3d61" "800162"
    assert ldap_message(1, bind_request("cn=a", "b")).hex() == expected


def test_frame_size() -> None:
    message = ldap_message(7, tlv(0x42, b""))
    assert frame_size(message, 0) == len(message)
    assert frame_size(message[:-1], 0) is None
    assert frame_size(b"", 0) is None
    assert frame_size(b"\x30\x84\x00", 0) is None
    with pytest.raises(BerError):
        frame_size(b"\x04\x00", 0)
    with pytest.raises(BerError):
        frame_size(b"\x30\x80", 0)  # indefinite length is not LDAP


def test_search_template() -> None:
    search = SearchTemplate.build("ou=people", SCOPE_SUBTREE, compile_filter("(uid={username})"),
                                  ["uid", "memberOf"], size_limit=2, time_limit=5)
    message = ldap_message(2, search.encode(username="bob"))
    message_id, tag, _start, _end = decode_envelope(message)
    assert (message_id, tag) == (2, 0x63)


def entry_message(message_id: int, dn: str, attributes: dict[str, list[str]]) -> bytes:
    encoded = b"".join(
        tlv(SEQUENCE, tlv(OCTET_STRING, name.encode())
            + tlv(SET, b"".join(tlv(OCTET_STRING, v.encode()) for v in values)))
        for name, values in attributes.items())
    body = tlv(OCTET_STRING, dn.encode()) + tlv(SEQUENCE, encoded)
    return ldap_message(message_id, tlv(SEARCH_RESULT_ENTRY, body))


def result_message(message_id: int, tag: int, code: int, diagnostic: str = "") -> bytes:
    body = integer(code, ENUMERATED) + tlv(OCTET_STRING, b"") + tlv(OCTET_STRING,
                                                                        diagnostic.encode())
    return ldap_message(message_id, tlv(tag, body))


def test_decode_entry() -> None:
    message = entry_message(3, "uid=zoë,ou=people", {"uid": ["zoë"], "memberOf": ["cn=a", "cn=b"]})
    _id, _tag, start, end = decode_envelope(message)
    entry = decode_entry(message, start, end)
    assert entry.dn == "uid=zoë,ou=people"
    assert entry.values("MEMBEROF") == ["cn=a", "cn=b"] and entry.first("uid") == "zoë"


# ---------------------------------------------------------------- the protocol


def connected_client() -> tuple[LdapClientProtocol, StringTransport, Clock]:
    clock = Clock()
    client = LdapClientProtocol(clock, Endpoint("ldap://test"))
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock


def test_replies_are_matched_by_message_id_and_may_arrive_in_pieces() -> None:
    client, transport, _clock = connected_client()
    replies: list[Any] = []
    client.request(bind_request("cn=a", "pw"), 5).addCallback(replies.append)
    client.request(b"\x63\x00", 5).addCallback(replies.append)
    assert transport.value().startswith(ldap_message(1, bind_request("cn=a", "pw")))
    stream = (entry_message(2, "uid=a", {"uid": ["a"]}) + result_message(1, BIND_RESPONSE, 49)
              + result_message(2, SEARCH_RESULT_DONE, 0))
    for i in range(len(stream)):
        client.dataReceived(stream[i : i + 1])
    assert [r.code for r in replies] == [49, 0]
    assert replies[1].entries[0].dn == "uid=a"
    assert client.pending == {}


def test_timeout_fails_the_request_and_drops_the_connection() -> None:
    client, transport, clock = connected_client()
    failures: list[Any] = []
    client.request(b"\x63\x00", 2).addErrback(failures.append)
    clock.advance(2)
    assert failures[0].check(OperationTimeout)
    assert transport.disconnecting or getattr(transport, "disconnected", False)


def test_garbage_drops_the_connection_and_fails_pending_requests() -> None:
    client, transport, _clock = connected_client()
    failures: list[Any] = []
    client.request(b"\x63\x00", 5).addErrback(failures.append)
    client.dataReceived(b"\x04\x03abc")
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    client.connectionLost(Failure(Exception("aborted")))
    assert failures[0].check(ConnectionLost)


def test_notice_of_disconnection() -> None:
    client, transport, _clock = connected_client()
    client.dataReceived(result_message(0, 0x78, 52, "shutting down"))
    assert transport.disconnecting or getattr(transport, "disconnected", False)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_never_raise(data: bytes) -> None:
    """Garbage from the directory: the waiting request gets one outcome at most --
    a reply, or ConnectionLost with the connection dropped -- and nothing raises."""
    client, transport, _clock = connected_client()
    outcomes: list[Any] = []
    client.request(b"\x63\x00", 5).addBoth(outcomes.append)
    client.dataReceived(data)
    client.dataReceived(data)
    client.connectionLost(Failure(Exception("closed by the test")))
    assert len(outcomes) == 1
    outcome = outcomes[0]
    if isinstance(outcome, Failure):
        assert outcome.check(ConnectionLost), outcome
    else:
        assert isinstance(outcome, Reply)


def test_handshake_timeout_then_connection_lost() -> None:
    client, _transport, clock = connected_client()
    failures: list[Any] = []
    client.wait_for_handshake(1).addErrback(failures.append)
    clock.advance(1)
    client.connectionLost(Failure(Exception("gone")))  # must not fire the handshake twice
    assert len(failures) == 1


# ---------------------------------------------------------------- fast encoding and decoding


def tree_encoding(search: SearchTemplate, **values: str) -> bytes:
    """The request as the filter tree encodes it (the reference for the one-slot path)."""
    raw = {k: v.encode() for k, v in values.items()}
    return tlv(SEARCH_REQUEST, search.head + search.filter.root.encode(raw) + search.tail)


LONG_NAMES = ["x" * 100, "y" * 130, "z" * 300, "ü" * 40_000]  # every BER length form


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("username", ["alice", "a*b(c)\\d", "zoë", "user@realm", *LONG_NAMES])
def test_one_slot_encoding_matches_the_tree(template: str, username: str) -> None:
    search = SearchTemplate.build("ou=people", SCOPE_SUBTREE, compile_filter(template),
                                  ["uid", "memberOf"], size_limit=2, time_limit=5)
    assert search.encode(username=username) == tree_encoding(search, username=username)


def test_one_slot_only_for_a_single_placeholder() -> None:
    assert compile_filter("(uid={username})").slot is not None
    assert compile_filter("(&(objectClass=person)(uid={username}))").slot is not None
    assert compile_filter("(mail={username}@example.org)").slot is not None
    assert compile_filter("(|(uid={username})(mail={username}))").slot is None
    assert compile_filter("(objectClass=*)").slot is None


@settings(max_examples=200)
@given(st.text(min_size=1, max_size=300))
def test_one_slot_escapes_like_a_string_filter(username: str) -> None:
    for template in ("(&(objectClass=person)(uid={username}))", "(uid={username}*)"):
        ours = compile_filter(template).encode(username=username)
        assert ours == ldap3_encoding(user_search_filter(template, username))


ATTRIBUTE_NAMES = st.sampled_from(["uid", "UID", "memberOf", "MEMBEROF", "cn", "mail"])


@settings(max_examples=300)
@given(st.text(max_size=80),
       st.lists(st.tuples(ATTRIBUTE_NAMES, st.lists(st.text(max_size=60), max_size=4)),
                max_size=5))
def test_user_entry_reader_agrees_with_decode_entry(
        dn: str, attributes: list[tuple[str, list[str]]]) -> None:
    body = b"".join(
        tlv(SEQUENCE, tlv(OCTET_STRING, name.encode())
            + tlv(SET, b"".join(tlv(OCTET_STRING, v.encode()) for v in values)))
        for name, values in attributes)
    message = ldap_message(9, tlv(SEARCH_RESULT_ENTRY, tlv(OCTET_STRING, dn.encode())
                                  + tlv(SEQUENCE, body)))
    _id, _tag, start, end = decode_envelope(message)
    full = decode_entry(message, start, end)
    for use_memberof in (True, False):
        user = UserEntryReader("uid", use_memberof).read(message, start, end)
        assert user.dn == full.dn and user.name == full.first("uid")
        assert user.member_of == (full.values("memberOf") if use_memberof else [])
        assert user.mail is None
    with_mail = UserEntryReader("uid", True, "Mail").read(message, start, end)
    assert with_mail.mail == full.first("mail")


def test_large_replies_in_pieces_and_several_in_one_piece() -> None:
    client, _transport, _clock = connected_client()
    replies: list[Reply] = []
    for _ in range(3):
        client.request(b"\x63\x00", 5).addCallback(replies.append)
    big = entry_message(1, "uid=a", {"memberOf": [f"cn=group{i}" for i in range(5000)]})
    stream = (big + result_message(1, SEARCH_RESULT_DONE, 0)
              + result_message(2, SEARCH_RESULT_DONE, 0) + result_message(3, SEARCH_RESULT_DONE, 4))
    for i in range(0, len(stream), 1000):
        client.dataReceived(stream[i : i + 1000])
    assert [r.code for r in replies] == [0, 0, 4]
    assert len(replies[0].entries[0].values("memberOf")) == 5000


# ---------------------------------------------------------------- timeouts: a timer per connection


def test_one_timer_serves_every_request_on_a_connection() -> None:
    client, transport, clock = connected_client()
    failures: list[Any] = []
    for _ in range(50):
        client.request(b"\x63\x00", 2).addErrback(failures.append)
        clock.advance(0.01)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.4)  # now 1.9
    assert failures == []
    clock.advance(0.1)  # the first deadline: each request fails at its own
    assert len(failures) == 1 and failures[0].check(OperationTimeout)
    assert "no answer within 2s" in str(failures[0].value)
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    clock.advance(0.5)
    assert len(failures) == 50


def test_a_reply_does_not_cancel_the_timer_but_no_request_fails_early() -> None:
    client, _transport, clock = connected_client()
    outcomes: list[Any] = []
    client.request(b"\x63\x00", 2).addBoth(outcomes.append)
    client.dataReceived(result_message(1, SEARCH_RESULT_DONE, 0))
    clock.advance(1.5)
    client.request(b"\x63\x00", 2).addBoth(outcomes.append)  # due at 3.5
    clock.advance(0.5)  # the timer of the first request fires and re-arms
    assert len(outcomes) == 1 and len(clock.getDelayedCalls()) == 1
    clock.advance(1.4)
    assert len(outcomes) == 1
    clock.advance(0.1)
    assert isinstance(outcomes[1], Failure) and outcomes[1].check(OperationTimeout)


def test_a_shorter_timeout_re_arms_the_timer_earlier() -> None:
    client, _transport, clock = connected_client()
    failures: list[Any] = []
    client.request(b"\x63\x00", 10).addErrback(failures.append)
    client.request(b"\x63\x00", 1).addErrback(failures.append)
    clock.advance(1)
    assert len(failures) == 1 and "within 1s" in str(failures[0].value)


def test_connection_lost_cancels_the_timer() -> None:
    client, _transport, clock = connected_client()
    failures: list[Any] = []
    client.request(b"\x63\x00", 2).addErrback(failures.append)
    client.connectionLost(Failure(Exception("gone")))
    assert clock.getDelayedCalls() == []
    assert len(failures) == 1 and not failures[0].check(OperationTimeout)


# ---------------------------------------------------------------- verify(), without sockets


class FakeServer:
    """The server side of an injected connection: reads requests, writes replies."""

    def __init__(self, client: LdapClientProtocol, transport: StringTransport) -> None:
        self.client = client
        self.transport = transport

    def requests(self) -> list[tuple[int, int]]:
        """(message id, protocolOp tag) of everything sent since the last call."""
        data, found = self.transport.value(), []
        self.transport.clear()
        pos = 0
        while (size := frame_size(data, pos)) is not None:
            message_id, tag, _start, _end = decode_envelope(data[pos : pos + size])
            found.append((message_id, tag))
            pos += size
        return found

    def answer_search(self, entries: list[tuple[str, dict[str, list[str]]]], code: int = 0) -> None:
        [(message_id, tag)] = self.requests()
        assert tag == SEARCH_REQUEST
        for dn, attributes in entries:
            self.client.dataReceived(entry_message(message_id, dn, attributes))
        self.client.dataReceived(result_message(message_id, SEARCH_RESULT_DONE, code))

    def answer_bind(self, code: int = 0) -> None:
        [(message_id, tag)] = self.requests()
        assert tag == BIND_REQUEST
        self.client.dataReceived(result_message(message_id, BIND_RESPONSE, code))


class Wired:
    """An AsyncLdapDirectory on a Clock whose links are already connected to fakes."""

    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        options = LdapOptions(urls=["ldap://test"], user_base="ou=people", pool_size=1,
                              bind_pool_size=1, dn_cache_seconds=0, timeout=2.0)
        for key, value in overrides.items():
            setattr(options, key, value)
        self.directory = AsyncLdapDirectory(options, self.clock)
        self.coroutines = 0
        self.directory._run = self._counting  # type: ignore[method-assign]
        self.search = self._wire(self.directory._service[0])
        self.bind = self._wire(self.directory._binders.links[0])

    def _wire(self, link: Any) -> FakeServer:
        client = LdapClientProtocol(self.clock, self.directory.endpoints.all[0])
        transport = StringTransport()
        client.makeConnection(transport)
        link.client = client
        return FakeServer(client, transport)

    def _counting(self, coroutine: Any) -> Any:
        self.coroutines += 1
        return defer.Deferred.fromCoroutine(coroutine)

    def verify(self, username: str, password: str, slow: bool = False) -> list[Any]:
        """The outcome (filled in once it is known) of a verify on the fast or slow path."""
        directory = self.directory
        if slow:
            d = directory._run(directory._verify(username, password))
        else:  # as the core calls it: the look-up, then the password
            def check(identity: Identity | None) -> Any:
                if identity is None:
                    raise UnknownUser(f"no such user: {username!r}")
                return directory.check_password(identity, password)

            d = directory.lookup(username).addCallback(check)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        return outcome


ALICE = ("uid=alice,ou=people", {"uid": ["alice"], "memberOf": ["cn=staff,ou=g", "cn=admins,ou=g"]})


def outcome_of(result: list[Any]) -> Any:
    [value] = result
    if isinstance(value, Failure):
        return (type(value.value), str(value.value))
    return value


@pytest.mark.parametrize("slow", [False, True])
def test_verify_success_wrong_password_and_unknown_user(slow: bool) -> None:
    wired = Wired()
    ok = wired.verify("alice", "pw", slow)
    wired.search.answer_search([ALICE])
    wired.bind.answer_bind(0)
    assert outcome_of(ok) == Identity("alice", "uid=alice,ou=people",
                                      ("cn=admins,ou=g", "cn=staff,ou=g"))

    wrong = wired.verify("alice", "bad", slow)
    wired.search.answer_search([ALICE])
    wired.bind.answer_bind(49)
    assert outcome_of(wrong) == (InvalidCredentials, "bind refused: result 49")

    unknown = wired.verify("nobody", "pw", slow)
    wired.search.answer_search([])
    assert outcome_of(unknown) == (UnknownUser, "no such user: 'nobody'")
    assert wired.bind.requests() == []

    ambiguous = wired.verify("alice", "pw", slow)
    wired.search.answer_search([ALICE, ALICE], code=4)
    assert outcome_of(ambiguous) == (UnknownUser, "no such user: 'alice'")

    busy = wired.verify("alice", "pw", slow)
    wired.search.answer_search([], code=51)
    assert outcome_of(busy) == (DirectoryUnavailable, "search: result 51")

    transient = wired.verify("alice", "pw", slow)
    wired.search.answer_search([ALICE])
    wired.bind.answer_bind(51)
    assert outcome_of(transient)[0] is DirectoryUnavailable
    # The fast path makes no coroutine at all; the slow one makes one per verify.
    assert wired.coroutines == (6 if slow else 0)
    assert (wired.directory.stats.searches, wired.directory.stats.binds) == (6, 3)


def test_empty_dn_never_binds() -> None:
    wired = Wired()
    result = wired.verify("alice", "pw")
    wired.search.answer_search([("", {"uid": ["alice"]})])
    assert outcome_of(result) == (UnknownUser, "no such user: 'alice'")
    assert wired.bind.requests() == []


def test_no_group_search_unless_asked_then_one_by_a_coroutine() -> None:
    wired = Wired(group_base="ou=g")
    result = wired.verify("bob", "pw")
    wired.search.answer_search([("uid=bob,ou=people", {"uid": ["bob"]})])  # no memberOf
    wired.bind.answer_bind(0)
    bob = outcome_of(result)
    assert bob == Identity("bob", "uid=bob,ou=people", ())
    assert not bob.groups_complete and wired.coroutines == 0
    assert wired.search.requests() == [] and wired.directory.stats.group_searches == 0

    asked: list[Any] = []
    wired.directory.groups(bob).addBoth(asked.append)
    assert wired.coroutines == 1 and asked == []
    wired.search.answer_search([("cn=vpn,ou=g", {})])
    full = outcome_of(asked)
    assert full == Identity("bob", "uid=bob,ou=people", ("cn=vpn,ou=g",))
    assert full.groups_complete and wired.directory.stats.group_searches == 1


def test_an_entry_with_memberof_or_without_group_base_needs_no_group_search() -> None:
    wired = Wired(group_base="ou=g")
    result = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])
    wired.bind.answer_bind(0)
    alice = outcome_of(result)
    assert alice.groups_complete
    assert outcome_of([wired.directory.groups(alice).result]) is alice
    plain = Wired()
    result = plain.verify("bob", "pw")
    plain.search.answer_search([("uid=bob,ou=people", {"uid": ["bob"]})])
    plain.bind.answer_bind(0)
    assert outcome_of(result).groups_complete
    assert wired.search.requests() == [] and plain.search.requests() == []


def test_groups_are_cached_per_entry_dn_until_group_cache_seconds_pass() -> None:
    wired = Wired(group_base="ou=g", group_cache_seconds=60)
    bob = Identity("bob", "uid=bob,ou=people", (), groups_complete=False)

    def groups() -> Any:
        asked: list[Any] = []
        wired.directory.groups(bob).addBoth(asked.append)
        if not asked:
            wired.search.answer_search([("cn=vpn,ou=g", {})])
        return outcome_of(asked)

    assert groups().groups == ("cn=vpn,ou=g",)
    wired.clock.advance(59)
    assert groups().groups == ("cn=vpn,ou=g",)  # from the cache: no search
    assert wired.directory.stats.group_searches == 1 and wired.directory.group_cache.hits == 1
    wired.clock.advance(1)  # expired: searched again
    assert groups().groups == ("cn=vpn,ou=g",)
    assert wired.directory.stats.group_searches == 2
    off = Wired(group_base="ou=g", group_cache_seconds=0)
    for _ in range(2):
        asked: list[Any] = []
        off.directory.groups(bob).addBoth(asked.append)
        off.search.answer_search([])
        assert outcome_of(asked).groups == ()
    assert off.directory.stats.group_searches == 2 and len(off.directory.group_cache) == 0


def test_the_group_cache_is_bounded() -> None:
    from backends.ldap_async import _GroupCache

    cache = _GroupCache(60, lambda: 0.0, limit=3)
    for i in range(5):
        cache.put(f"uid=u{i}", (f"cn=g{i}",))
    assert len(cache) == 3 and cache.get("uid=u0") is None and cache.get("uid=u4") == ("cn=g4",)


def test_a_failed_group_search_is_unavailable_never_an_empty_group_list() -> None:
    wired = Wired(group_base="ou=g")
    bob = Identity("bob", "uid=bob,ou=people", (), groups_complete=False)
    asked: list[Any] = []
    wired.directory.groups(bob).addBoth(asked.append)
    wired.search.answer_search([], code=51)
    assert outcome_of(asked) == (DirectoryUnavailable, "search: result 51")
    assert len(wired.directory.group_cache) == 0


def test_a_search_timeout_on_the_fast_path_fails_over_like_the_coroutine() -> None:
    wired = Wired()
    result = wired.verify("alice", "pw")
    wired.clock.advance(2)
    assert result == [] and wired.directory.endpoints.all[0].down_until > 0
    wired.clock.advance(2)  # the retry (same connection: it is still closing) times out too
    kind, message = outcome_of(result)
    assert kind is DirectoryUnavailable
    assert message.count("no answer within 2s") == 2


def test_a_lost_bind_is_retried_on_its_link() -> None:
    wired = Wired()
    result = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])
    wired.bind.requests()
    fresh = LdapClientProtocol(wired.clock, wired.directory.endpoints.all[0])
    fresh_transport = StringTransport()
    fresh.makeConnection(fresh_transport)
    opened: list[bool] = []

    def connect(service: bool) -> defer.Deferred[LdapClientProtocol]:
        opened.append(service)
        return defer.succeed(fresh)

    wired.directory._connect = connect  # type: ignore[method-assign]
    wired.bind.client.connectionLost(Failure(ConnectionLost("reset")))
    assert opened == [False]  # the bind link reconnects, the bind is sent again
    FakeServer(fresh, fresh_transport).answer_bind(0)
    assert outcome_of(result).username == "alice"


def test_queued_binds_wait_for_the_link_and_time_out_in_the_queue() -> None:
    wired = Wired()
    first = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])
    second = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])
    wired.bind.answer_bind(0)  # the first bind; the second is sent on the released link
    assert outcome_of(first).username == "alice"
    wired.bind.answer_bind(49)
    assert outcome_of(second)[0] is InvalidCredentials

    third = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])
    wired.clock.advance(1)
    fourth = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])  # queued behind the unanswered third bind
    wired.clock.advance(1.9)
    assert fourth == []
    wired.clock.advance(0.1)
    assert outcome_of(fourth) == (DirectoryUnavailable, "no free bind connection within 2s")
    assert third == []  # (its bind timed out at 2 and was sent again, as the coroutine does)


def test_a_cached_dn_refused_is_looked_up_again() -> None:
    wired = Wired(dn_cache_seconds=60)
    first = wired.verify("alice", "pw")
    wired.search.answer_search([ALICE])
    wired.bind.answer_bind(0)
    assert outcome_of(first).username == "alice"
    again = wired.verify("alice", "pw")  # from the cache: no search, the bind at once
    assert wired.search.requests() == []
    wired.bind.answer_bind(49)
    wired.search.answer_search([ALICE])  # same DN: the refusal stands, one bind only
    assert outcome_of(again) == (InvalidCredentials, "bind refused: result 49")
    assert wired.bind.requests() == []


def test_the_request_path_does_not_load_ldap3() -> None:
    # ldap3 (and pyasn1 with it) is the admin commands' client: ~10 MB a serve with
    # an LDAP directory does not need to keep resident.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, backends.ldap_async, proxy.service, proxy.radius.server, "
            "proxy.ldap.server, proxy.directories as d, proxy.config as c; "
            "from backends.ldap_common import LdapOptions; "
            "d.ldap_options(c.DirectorySettings(type='ldap', ldap=LdapOptions())); "
            "print(sorted(m for m in ('ldap3', 'alembic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]"
