"""The LDAP session state machine, driven directly: events in, actions out, no
transport and no reactor. The core is the real one (RealCore: the product's
engine on SQLite, with the in-memory directory for its look-ups and password
checks); the upstream directory is played by each test, message by message,
so every interleaving is one the test chose."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from backends.base import DirectoryUnavailable, Identity
from backends.ldapwire import ber, messages
from backends.ldapwire.messages import ResultCode
from policy.decision import AuthRequest, Decision, Outcome, Reason
from policy.engine import CREDENTIALS, PasswordCheck
from proxy.ldap.config import LdapFrontendConfig
from proxy.ldap.events import CountingLdapEvents
from proxy.ldap.server import LdapProxyFactory
from proxy.ldap.session import (
    TRANSITIONS,
    Action,
    Do,
    LdapSession,
    LogLine,
    State,
    Step,
    Timer,
)
from proxy.ldap.upstream_session import RECONNECT_BACKOFF, Bound, Link, SessionBug
from tests.ldap_messages import (
    UNKNOWN_OID,
    abandon,
    bind,
    bind_response,
    done,
    entry,
    search,
    whoami,
)
from tests.unit.test_ldap_frontend_fakes import CachingDirectory, MemoryDirectory, RealCore, user_dn

ALICE = user_dn("alice")
BOB = user_dn("bob")
SVC = "cn=svc,ou=services,dc=example,dc=org"


# ---------------------------------------------------------------- messages


def ids_and_tags(data: list[bytes]) -> list[tuple[int, int]]:
    return [messages.peek_id_and_tag(m) for m in data]


def is_notice(message: bytes) -> bool:
    return (messages.peek(message).message_id == 0
            and messages.extended_response_name(message) == messages.NOTICE_OF_DISCONNECTION_OID)


# ---------------------------------------------------------------- the driver


class Driver:
    """Feeds one LdapSession and carries out its actions on plain lists: what
    went to the directory, what the client got, the core requests waiting,
    the timers running (by deadline), and how each side was closed.

    The core's part, as the Twisted side plays it: ASK_CORE waits in ``asks``
    until ``decide()`` runs the core's start on it; FINISH_CHECK and
    ABANDON_CHECK reach the core at once; finish's decision is fed back at the
    end of the event that asked for it (``auto_finish``), or waits in
    ``finishing`` until ``finish()``; CANCEL_CORE forgets what was asked."""

    def __init__(self, core: RealCore | None = None, start_tls: bool = False,
                 auto_finish: bool = True, **settings: Any) -> None:
        self.config = replace(
            LdapFrontendConfig(exempt=(SVC,), idle_timeout=0, unbound_timeout=0), **settings
        )
        if core is None:
            core = RealCore()
            _cores.append(core)
        self.core = core
        self.events = CountingLdapEvents()
        # The factory is the real one: the bind rules and the shared buffer count.
        self.factory = LdapProxyFactory(self.config, core, events=self.events, reactor=Clock())
        self.now = 1000.0
        self.session = LdapSession(
            self.config, rules=self.factory, buffers=self.factory, events=self.events,
            clock=lambda: self.now, start_tls_available=start_tls,
        )
        self.upstream: list[bytes] = []  # everything sent to the directory, in order
        self.client: list[bytes] = []  # everything the client got, not yet read()
        self.asks: list[AuthRequest] = []  # core requests not yet decided
        self.auto_finish = auto_finish
        self.finishing: list[Any] = []  # finish's decisions (or failures) not yet fed back
        self.finished = 0  # password checks finished, and abandoned
        self.abandoned = 0
        self.abandon_reasons: list[Reason] = []
        self.checked_in_core = 0  # password checks the core made itself (check_here)
        self.timers: dict[Timer, float] = {}
        self.logs: list[LogLine] = []
        self.client_closed = False
        self.upstream_closed: bool | None = None  # True: aborted
        self.connects = 0
        self.core_cancelled = 0
        self.tls_started = False
        self.paused = False
        self.actions: list[Action] = []  # every action, in order

    # -- carrying out actions

    def run(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        for do, argument in actions:
            if do is Do.SEND_UPSTREAM:
                assert self.upstream_closed is None, "sent on a closed upstream"
                self.upstream.append(argument)
            elif do is Do.SEND_CLIENT:
                assert not self.client_closed, "sent to a closed client"
                self.client.extend(argument)
            elif do is Do.START_TIMER:
                timer, seconds = argument
                assert timer not in self.timers, f"{timer} started twice"
                self.timers[timer] = self.now + seconds
            elif do is Do.CANCEL_TIMER:
                del self.timers[argument]
            elif do is Do.ASK_CORE:
                self.asks.append(argument)
            elif do is Do.FINISH_CHECK:
                check, verdict = argument
                self.finished += 1
                self.finishing.append(fired(check.finish(verdict)))
            elif do is Do.CHECK_IN_CORE:
                self.finished += 1
                self.checked_in_core += 1
                self.finishing.append(fired(argument.check_here()))
            elif do is Do.ABANDON_CHECK:
                check, reason = argument
                self.abandoned += 1
                self.abandon_reasons.append(reason)
                check.abandon(reason)
            elif do is Do.CANCEL_CORE:
                self.core_cancelled += 1
                self.asks.clear()
                self.finishing.clear()
            elif do is Do.CONNECT_UPSTREAM:
                self.connects += 1
            elif do is Do.CLOSE_UPSTREAM:
                if self.upstream_closed is None:
                    self.upstream_closed = argument
            elif do is Do.CLOSE_CLIENT:
                self.client_closed = True
            elif do is Do.PAUSE_READING:
                self.paused = True
            elif do is Do.RESUME_READING:
                self.paused = False
            elif do is Do.START_TLS:
                self.tls_started = True
            elif do is Do.LOG:
                self.logs.append(argument)
        if self.auto_finish and self.finishing and not self._feeding:
            self._feeding = True
            try:
                while self.finishing:
                    self.finish()
            finally:
                self._feeding = False
        return actions

    _feeding = False

    def sibling(self) -> Driver:
        """Another session of the same factory (shared rules and buffer budget)."""
        other = Driver(self.core, **{k: getattr(self.config, k) for k in (
            "max_buffered_bytes", "max_message_size", "require_bind")})
        other.factory, other.events = self.factory, self.events
        other.session = LdapSession(other.config, rules=self.factory, buffers=self.factory,
                                    events=self.events, clock=lambda: other.now)
        return other

    # -- events

    def start(self, ready: bool | None = True) -> Driver:
        self.run(self.session.start("10.0.0.7"))
        if ready is True:
            self.run(self.session.upstream_ready())
        elif ready is False:
            self.run(self.session.upstream_unreachable("connect_failed"))
        return self

    def send(self, *data: bytes) -> list[Action]:
        return self.run(self.session.data_received(b"".join(data)))

    def answer(self, *responses: bytes) -> list[Action]:
        return self.run(self.session.upstream_messages(list(responses)))

    def decide(self) -> list[Action]:
        """The real core's start on the oldest request waiting: a decision, or
        the password check the session then binds upstream for."""
        result = fired(self.core(self.asks.pop(0)))
        if isinstance(result, Failure):
            return self.run(self.session.core_failed(result.value))
        if isinstance(result, PasswordCheck):
            return self.run(self.session.core_check(result))
        return self.run(self.session.core_decided(result))

    def finish(self) -> list[Action]:
        """Finish's oldest decision, fed back."""
        result = self.finishing.pop(0)
        if isinstance(result, Failure):
            return self.run(self.session.core_failed(result.value))
        return self.run(self.session.core_decided(result))

    def advance(self, seconds: float) -> None:
        """Time passes; timers fire in order."""
        until = self.now + seconds
        while True:
            due = sorted((at, t.value, t) for t, at in self.timers.items() if at <= until)
            if not due:
                break
            at, _, timer = due[0]
            self.now = max(self.now, at)
            del self.timers[timer]
            self.run(self.session.timer_fired(timer))
        self.now = until

    # -- looking

    def read(self) -> list[bytes]:
        got, self.client = self.client, []
        return got

    def result(self) -> messages.LdapResult:
        (response,) = self.read()
        return messages.decode_result(response)

    @property
    def state(self) -> State:
        return self.session.state

    def upstream_binds(self) -> list[tuple[int, str, bytes]]:
        found = []
        for message in self.upstream:
            header = messages.peek(message)
            if header.op_tag == messages.BIND_REQUEST:
                request = messages.decode_bind_request(message)
                found.append((request.message_id, request.name, request.password or b""))
        return found

    def closed_for(self, reason: str) -> bool:
        """Closed after a Notice of Disconnection, with ``reason`` counted."""
        return (self.session.closed and self.client_closed and bool(self.client)
                and is_notice(self.client[-1]) and self.events[("dropped", reason)] == 1)


def make(core: RealCore | None = None, **settings: Any) -> Driver:
    return Driver(core, **settings)


def fired(d: Any) -> Any:
    """What a Deferred the synchronous core returned fired with."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the core did not answer at once"
    return results[0]


_cores: list[RealCore] = []


@pytest.fixture(autouse=True)
def _close_cores() -> Any:
    yield
    while _cores:
        _cores.pop().close()


def bound_as_alice(**settings: Any) -> Driver:
    """A session whose upstream is bound as alice (after a bind with both factors)."""
    d = make(**settings).start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    d.answer(bind_response(2))
    assert d.result().code == 0
    assert d.session.upstream.bound is Bound.MAYBE and d.state is State.READY
    return d


# ---------------------------------------------------------------- the table


def test_every_state_but_closed_may_close_and_closed_is_final() -> None:
    for state in State:
        if state is State.CLOSED:
            assert TRANSITIONS[state] == {}
        else:
            assert TRANSITIONS[state][Step.CLOSE] is State.CLOSED


def test_a_step_outside_the_table_is_a_bug() -> None:
    d = make().start()
    with pytest.raises(SessionBug):
        d.session._go(Step.ANSWERED)  # READY has no bind to answer
    assert d.state is State.READY


def test_a_bug_closes_the_session_as_an_internal_error() -> None:
    d = make().start()
    d.run(d.session.crashed())
    assert d.closed_for("internal_error")
    assert messages.decode_result(d.client[-1]).code == ResultCode.OTHER
    assert d.upstream_closed is False


def test_the_first_connection_holds_requests_until_it_settles() -> None:
    d = make(require_bind=False).start(ready=None)
    assert d.state is State.CONNECTING and d.connects == 1
    d.send(search(2), search(3))
    assert d.upstream == [] and d.paused
    d.run(d.session.upstream_ready())
    assert d.upstream == [search(2), search(3)] and not d.paused
    assert d.state is State.READY


def test_a_down_first_connection_answers_52_within_the_backoff() -> None:
    d = make(require_bind=False).start(ready=False)
    assert d.session.upstream.link is Link.DOWN
    d.send(search(2))
    assert ids_and_tags(d.client) == [(2, messages.SEARCH_RESULT_DONE)]
    assert d.result().code == 52
    assert d.connects == 1 and d.events[("upstream_error", "connect_failed")] == 1
    d.advance(RECONNECT_BACKOFF)
    d.send(search(3), search(4))  # tried again; the next one waits for the attempt
    assert d.state is State.REACHING and d.connects == 2 and d.paused
    d.run(d.session.upstream_ready())
    assert d.upstream == [search(3), search(4)] and d.state is State.READY


# ---------------------------------------------------------------- invariant 1: message IDs


def test_forwarding_takes_the_id_until_the_final_response() -> None:
    d = make(require_bind=False).start()
    d.send(search(4))
    assert d.upstream == [search(4)]
    assert d.session.in_use == {4} and d.session.outstanding == {4}
    d.answer(entry(4))  # not final: still in use
    assert d.session.in_use == {4}
    d.answer(done(4))
    assert d.session.in_use == set() and d.session.outstanding == set()
    assert ids_and_tags(d.read()) == [(4, messages.SEARCH_RESULT_ENTRY),
                                      (4, messages.SEARCH_RESULT_DONE)]
    d.send(search(4))  # free again
    assert not d.session.closed and d.upstream == [search(4), search(4)]


def test_reusing_the_id_of_a_forwarded_operation_closes_both() -> None:
    d = make(require_bind=False).start()
    d.send(search(4))
    d.send(search(4))
    assert d.closed_for("message_id_reused")
    assert messages.decode_result(d.client[-1]).code == ResultCode.PROTOCOL_ERROR
    assert d.upstream == [search(4)] and d.upstream_closed is False


def test_reusing_an_id_within_one_segment_closes_before_anything_is_handled() -> None:
    """The directory's protocolError for the extended operation must not be taken
    for the answer to the proxy's bind: the bind never goes anywhere."""
    d = make(require_bind=False).start()
    d.send(messages.encode_extended_request(5, UNKNOWN_OID), bind(5, ALICE, "alice-pw,000000"))
    assert d.closed_for("message_id_reused")
    assert d.upstream == [] and d.asks == [] and d.core.requests == []


def test_reusing_the_id_of_a_bind_being_decided_closes_both() -> None:
    d = make().start()
    d.send(bind(3, ALICE, d.core.good()))
    assert d.state is State.BIND_DECIDING
    d.send(whoami(3))
    assert d.closed_for("message_id_reused")
    assert d.upstream == []


def test_reusing_the_id_of_a_bind_at_the_directory_closes_both() -> None:
    d = make().start()
    d.send(bind(3, ALICE, d.core.good()))
    d.decide()
    assert d.state is State.BIND_UPSTREAM and d.upstream_binds() == [(3, ALICE, b"alice-pw")]
    d.send(search(3))
    assert d.closed_for("message_id_reused")
    # the bind ends with the session: counted as the directory's failure, never answered
    assert d.events[("bind", "reject", "directory_unavailable")] == 1
    assert not any(messages.peek(m).op_tag == messages.BIND_RESPONSE for m in d.client)


@pytest.mark.parametrize(("message_id", "reason"),
                         [(0, "protocol_error"), (messages.MAX_MESSAGE_ID + 1, "malformed")])
def test_message_id_zero_or_out_of_range_is_a_protocol_error(message_id: int, reason: str) -> None:
    d = make(require_bind=False).start()
    d.send(search(message_id))
    assert d.closed_for(reason)
    assert messages.decode_result(d.client[-1]).code == ResultCode.PROTOCOL_ERROR
    assert d.upstream == []


def test_an_id_answered_here_is_free_at_once() -> None:
    d = make().start()
    d.send(search(6))  # refused: bind required
    assert d.result() == (50, "", "bind required")
    assert d.session.in_use == set()
    assert d.events[("refused", "search", "bind_required")] == 1
    d.send(bind(6, ALICE, d.core.good()))
    assert d.state is State.BIND_DECIDING


def test_abandon_frees_the_id_of_a_forwarded_operation() -> None:
    d = make(require_bind=False).start()
    d.send(search(5))
    d.send(abandon(6, 5))
    assert d.upstream == [search(5), abandon(6, 5)]
    assert d.session.in_use == set() and d.session.outstanding == set()
    assert d.events[("forwarded", "abandon")] == 1
    d.send(search(5))
    assert not d.session.closed


def test_abandon_of_an_id_not_forwarded_frees_nothing() -> None:
    d = make(require_bind=False).start()
    d.send(search(5))
    d.send(abandon(6, 9))  # nothing with ID 9: forwarded, harmless
    assert d.session.in_use == {5}
    d.send(abandon(7, 5))
    assert d.session.in_use == set()


def test_an_abandon_with_an_id_in_use_closes_both() -> None:
    d = make(require_bind=False).start()
    d.send(search(5))
    d.send(abandon(5, 9))
    assert d.closed_for("message_id_reused")


def test_abandon_of_an_operation_queued_behind_a_bind_does_not_free_it() -> None:
    """The abandon waits behind the bind like everything else; by then the search
    it names has been forwarded and answered normally."""
    d = make(require_bind=False).start()
    d.send(bind(2, SVC, "svc-secret"), search(3), abandon(4, 3))
    assert d.upstream == [bind(2, SVC, "svc-secret")] and d.session.in_use == {2, 3}
    d.answer(bind_response(2))
    assert d.upstream[1:] == [search(3), abandon(4, 3)]
    assert d.session.in_use == set()  # the abandon reached the search while outstanding


# ------------------------------------------------------------ invariant 2: a bind waits, then holds


def test_a_bind_waits_for_outstanding_operations() -> None:
    d = make(require_bind=False).start()
    d.send(search(2), whoami(3), bind(4, ALICE, d.core.good()))
    assert d.state is State.BIND_WAITING_FOR_QUIET
    assert Timer.BIND_WAIT in d.timers and d.asks == []
    d.answer(done(2))
    assert d.state is State.BIND_WAITING_FOR_QUIET and d.asks == []
    d.answer(messages.encode_extended_response(3, 0))
    assert d.state is State.BIND_DECIDING and len(d.asks) == 1
    assert Timer.BIND_WAIT not in d.timers and Timer.BIND in d.timers
    d.decide()
    d.answer(bind_response(4))
    assert [m for m, _ in ids_and_tags(d.read())] == [2, 3, 4]
    assert d.state is State.READY and d.timers == {}


def test_a_bind_waiting_longer_than_bind_timeout_gets_52_and_closes() -> None:
    d = make(require_bind=False, bind_timeout=5).start()
    d.send(search(2), bind(3, ALICE, d.core.good()))
    d.advance(4.9)
    assert d.state is State.BIND_WAITING_FOR_QUIET
    d.advance(0.1)
    bind_answer, notice = d.client
    assert messages.peek_id_and_tag(bind_answer) == (3, messages.BIND_RESPONSE)
    assert messages.decode_result(bind_answer) == (52, "", "earlier operations still outstanding")
    assert is_notice(notice) and d.session.closed and d.client_closed
    assert d.events[("dropped", "bind_wait_timeout")] == 1
    assert d.events[("bind", "reject", "operations_outstanding")] == 1
    assert d.upstream == [search(2)] and d.core.requests == []


def test_nothing_read_after_a_bind_reaches_the_directory_before_its_answer() -> None:
    d = make(require_bind=False).start()
    d.send(bind(2, ALICE, d.core.good()), search(3), whoami(4))
    assert d.paused and d.session.queued == 2
    d.decide()
    assert d.upstream == [bind(2, ALICE, b"alice-pw")]  # the session bind, nothing else
    assert d.client == []
    d.answer(bind_response(2))
    assert ids_and_tags(d.read()) == [(2, messages.BIND_RESPONSE)]  # the answer first
    assert d.upstream[1:] == [search(3), whoami(4)] and not d.paused


def test_requests_after_a_failed_bind_wait_for_the_reset_too() -> None:
    d = bound_as_alice(require_bind=False)
    d.send(bind(5, ALICE, "alice-pw,000000"), search(6))
    d.decide()  # the code is wrong: the core checked the password itself
    assert d.state is State.RESETTING
    assert d.upstream_binds()[-1] == (5, "", b"")  # the reset reuses the bind's ID
    assert d.upstream[-1] != search(6) and d.client == []
    d.answer(bind_response(5))
    assert d.result().code == 49
    assert d.upstream[-1] == search(6)


def test_a_bind_answered_at_once_lets_the_next_requests_through() -> None:
    d = make().start()
    d.send(bind(2, ALICE, ""), bind(3, ALICE, ""))  # both refused here (53)
    assert [messages.decode_result(m).code for m in d.read()] == [53, 53]
    assert d.state is State.READY and d.timers == {} and d.upstream == []
    assert d.events[("bind", "reject", "empty_password")] == 2


# ---------------------------------------------------- invariant 3: only a BindResponse answers ours


def test_another_response_with_the_id_of_the_proxy_s_bind_closes_both() -> None:
    d = make().start()
    d.send(bind(5, ALICE, d.core.good()))
    d.decide()
    d.answer(messages.encode_extended_response(5, ResultCode.PROTOCOL_ERROR))
    assert d.closed_for("upstream_protocol_violation")
    assert d.upstream_closed is True  # aborted: the session is no longer known
    assert d.events[("upstream_error", "protocol_violation")] == 1
    assert d.events[("bind", "reject", "directory_unavailable")] == 1
    assert len(d.client) == 1  # the notice only, no bind answer
    d.read()
    assert d.answer(bind_response(5)) == []  # the real answer, too late: nothing


def test_a_wrong_type_answer_to_the_reset_closes_both_without_an_answer() -> None:
    d = bound_as_alice()
    d.send(bind(7, ALICE, "alice-pw,000000"))
    d.decide()
    assert d.state is State.RESETTING
    d.answer(done(7))
    assert d.closed_for("upstream_protocol_violation")
    assert [is_notice(m) for m in d.client] == [True]
    assert d.events[("bind", "reject", "bad_code")] == 1


def test_a_bind_response_nobody_asked_for_closes_both() -> None:
    d = bound_as_alice()
    d.answer(bind_response(9))
    assert d.closed_for("upstream_protocol_violation")


def test_a_bind_response_with_a_forwarded_operation_s_id_closes_both() -> None:
    d = make(require_bind=False).start()
    d.send(search(3))
    d.answer(bind_response(3))
    assert d.closed_for("upstream_protocol_violation")


def test_responses_before_the_own_answer_are_relayed_first() -> None:
    d = make(require_bind=False).start()
    d.send(search(2), bind(3, SVC, "svc-secret"))
    d.answer(done(2))  # quiet: the exempt bind is relayed
    assert d.upstream[-1] == bind(3, SVC, "svc-secret")
    d.read()
    d.send(search(4))  # queued behind the bind
    d.answer(bind_response(3))
    assert ids_and_tags(d.read()) == [(3, messages.BIND_RESPONSE)]
    assert d.upstream[-1] == search(4)


def test_a_malformed_response_drops_the_upstream() -> None:
    d = make(require_bind=False).start()
    d.send(search(3))
    d.answer(b"\x30\x03\x02\x01")
    assert d.closed_for("upstream_lost")
    assert d.upstream_closed is True
    assert d.events[("upstream_error", "malformed_response")] == 1


# -------------------------------------------------------- invariant 4: reset before a failed answer


def test_a_wrong_code_never_binds_the_session_as_the_user() -> None:
    """The second factor fails whatever the password: the core checks the password
    itself and the session is never bound on it (nothing to reset either)."""
    d = make().start()
    d.send(bind(2, ALICE, "alice-pw,000000"))
    d.decide()
    assert d.upstream == [] and [c.binds_session for c in d.core.checks] == [False]
    assert d.checked_in_core == 1
    assert d.core.directory.checks == [("alice", "alice-pw")]  # the core's one bind
    assert d.result() == (49, "", CREDENTIALS)
    assert d.core.failures("alice") == 1 and d.core.turns_held == 0
    assert d.events[("bind", "reject", "bad_code")] == 1


def test_a_code_used_elsewhere_while_the_session_bind_ran_is_reset_before_the_answer() -> None:
    """Both factors checked out before the bind, but another instance took the
    code meanwhile: finish refuses, and the session bound by the check is made
    anonymous before the client hears it."""
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    assert d.upstream_binds() == [(2, ALICE, b"alice-pw")]
    d.core.use_elsewhere("alice")
    d.answer(bind_response(2))  # the password is right: bound as alice
    assert d.state is State.RESETTING and d.client == []
    assert d.upstream_binds()[-1] == (2, "", b"")
    d.answer(bind_response(2))
    result = d.result()
    assert result.code == 49 and "used already" in result.diagnostic
    assert d.session.upstream.bound is Bound.ANONYMOUS and not d.session.authenticated
    assert d.events[("bind", "reject", "replayed_code")] == 1


def test_a_failed_bind_on_a_possibly_bound_session_is_answered_after_the_reset() -> None:
    d = bound_as_alice()
    d.send(bind(5, ALICE, "alice-pw,000000"))  # wrong code: decided by the core at once
    d.decide()
    assert d.state is State.RESETTING and d.client == []  # still bound as alice from before
    assert d.upstream_binds()[-1] == (5, "", b"")
    d.answer(bind_response(5))  # the reset held
    result = d.result()
    assert (result.code, result.diagnostic) == (49, CREDENTIALS)  # the core's one text
    assert d.session.upstream.bound is Bound.ANONYMOUS and not d.session.authenticated
    assert d.core.failures("alice") == 1


def test_a_wrong_password_is_the_directory_s_refusal_counted_by_the_core() -> None:
    d = make().start()
    d.send(bind(2, ALICE, "nope," + d.core.code()))
    d.decide()
    assert d.upstream_binds() == [(2, ALICE, b"nope")]  # the one check, on the session
    assert d.core.directory.checks == []  # the core binds nowhere itself
    d.answer(bind_response(2, ResultCode.INVALID_CREDENTIALS))
    assert d.state is State.RESETTING  # a refused bind may have left it as it was
    d.answer(bind_response(2))
    assert d.result() == (49, "", CREDENTIALS)
    assert d.core.failures("alice") == 1 and d.core.turns_held == 0
    assert d.events[("bind", "reject", "bad_password")] == 1


@pytest.mark.parametrize("answer", [bind_response(2, ResultCode.BUSY),
                                    b"\x30\x05\x02\x01\x02\x61\x00"])  # malformed
def test_another_answer_to_the_password_check_is_the_directory_s_failure(answer: bytes) -> None:
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    d.answer(answer)
    d.answer(bind_response(2))  # the reset
    assert d.result() == (52, "", "directory unavailable: try again in a moment")
    assert d.core.failures("alice") == 0 and d.core.turns_held == 0
    assert d.events[("bind", "reject", "directory_unavailable")] == 1


def test_the_password_check_is_one_upstream_bind_as_the_resolved_entry() -> None:
    d = make().start()
    d.send(bind(2, "UID=Alice, OU=People, DC=example, DC=org", d.core.good()))
    d.decide()
    (check,) = d.core.checks
    assert (check.identity.dn, check.password) == (ALICE, "alice-pw")
    assert d.upstream_binds() == [(2, ALICE, b"alice-pw")]  # the entry's DN, no code
    assert d.state is State.BIND_UPSTREAM and d.core.turns_held == 1  # alice's turn is held
    d.answer(bind_response(2))
    assert d.result().code == 0 and d.session.authenticated
    assert check.ended and d.core.turns_held == 0 and d.finished == 1
    assert d.core.directory.checks == []


def test_a_local_refusal_on_a_possibly_bound_session_resets_too() -> None:
    d = bound_as_alice()
    asked = len(d.core.requests)
    d.send(bind(5, ALICE, ""))  # 53, decided here
    assert d.state is State.RESETTING and d.client == []
    assert len(d.core.requests) == asked  # the core was not asked
    d.answer(bind_response(5))
    assert d.result().code == 53


def test_a_refusal_the_core_decides_before_the_password_check_binds_nothing() -> None:
    d = make().start()
    d.core.lock("alice")
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    assert d.result() == (49, "", "locked after too many failed attempts, until "
                          "2023-11-14T22:28:35Z")
    d.send(bind(3, user_dn("mallory"), "guess,123456"))  # no such entry
    d.decide()
    assert d.result() == (49, "", CREDENTIALS)
    assert d.upstream == [] and d.session.upstream.bound is Bound.ANONYMOUS
    assert d.core.checks == [] and d.core.turns_held == 0


@pytest.mark.parametrize("answer", [bind_response(5, 52), b"\x30\x05\x02\x01\x05\x61\x00"])
def test_a_failed_reset_closes_both_and_the_bind_gets_no_answer(answer: bytes) -> None:
    d = bound_as_alice()
    d.send(bind(5, ALICE, "alice-pw,000000"))
    d.decide()
    d.answer(answer)  # to the reset
    assert d.closed_for("reset_failed")
    assert [is_notice(m) for m in d.client] == [True]
    assert d.upstream_closed is False
    assert d.events[("upstream_error", "reset_failed")] == 1
    assert d.events[("bind", "reject", "bad_code")] == 1


def test_a_relayed_exempt_bind_is_the_client_s_bytes_and_the_directory_s_answer() -> None:
    d = make().start()
    message = bind(9, "CN=svc, OU=services, DC=example, DC=org", "svc-secret")
    d.send(message)
    assert d.upstream == [message] and d.core.requests == []
    answer = messages.encode_bind_response(9, 0, "welcome")
    d.answer(answer)
    assert d.read() == [answer]
    assert d.session.authenticated and d.events[("bind", "accept", "exempt")] == 1


def test_a_refused_exempt_bind_resets_the_session_it_may_have_bound() -> None:
    d = make().start()
    d.send(bind(9, SVC, "nope"))
    d.answer(bind_response(9, 49))
    assert d.state is State.RESETTING  # a relayed bind counts as possibly bound
    d.answer(bind_response(9))
    assert d.result().code == 49
    assert d.events[("bind", "reject", "bad_password")] == 1


# ---------------------------------------------------------------- bind_timeout in each phase


def test_bind_timeout_while_the_core_decides() -> None:
    d = make(bind_timeout=5).start()
    d.send(bind(2, ALICE, d.core.good()))
    (request,) = d.asks
    d.advance(5)
    assert d.core_cancelled == 1
    bind_answer = d.client[0]
    assert messages.decode_result(bind_answer) == (52, "", "timed out")
    assert d.closed_for("bind_timeout")
    assert d.session.upstream.bound is Bound.UNKNOWN
    late = Decision(Outcome.ACCEPT, Reason.OK, "alice", Identity("alice", ALICE))
    assert d.run(d.session.core_decided(late)) == []  # nothing binds behind the client's back
    check = fired(d.core(request))  # a password check that comes late: given back
    assert d.run(d.session.core_check(check)) == [
        (Do.ABANDON_CHECK, (check, Reason.DIRECTORY_UNAVAILABLE))]
    assert check.ended and d.core.turns_held == 0
    assert d.upstream == []


def test_bind_timeout_while_the_password_check_is_at_the_directory() -> None:
    d = make(bind_timeout=5).start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    assert d.core.turns_held == 1
    d.advance(5)
    assert messages.decode_result(d.client[0]).code == 52
    assert d.closed_for("bind_timeout")
    assert d.events[("bind", "reject", "directory_unavailable")] == 1
    assert d.abandoned == 1 and d.core.turns_held == 0  # the core's turn given back
    assert d.core.failures("alice") == 0
    assert d.answer(bind_response(2)) == []  # a late answer: the session is gone


def test_bind_timeout_while_the_core_finishes() -> None:
    d = make(bind_timeout=5, auto_finish=False).start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    d.answer(bind_response(2))
    assert d.state is State.BIND_FINISHING and d.finished == 1
    d.advance(5)
    assert d.core_cancelled == 1 and d.finishing == []  # its decision is not waited for
    assert messages.decode_result(d.client[0]) == (52, "", "timed out")
    assert d.closed_for("bind_timeout")
    assert d.core.turns_held == 0 and d.abandoned == 0


def test_bind_timeout_during_the_reset_closes_without_an_answer() -> None:
    d = bound_as_alice(bind_timeout=5)
    d.send(bind(5, ALICE, "alice-pw,000000"))
    d.decide()
    assert d.state is State.RESETTING
    d.advance(5)
    assert d.closed_for("reset_failed")
    assert [is_notice(m) for m in d.client] == [True]
    assert d.events[("bind", "reject", "bad_code")] == 1


def test_bind_timeout_while_the_upstream_is_tried_again() -> None:
    d = make(bind_timeout=5).start(ready=False)
    d.advance(RECONNECT_BACKOFF)
    d.send(bind(2, ALICE, d.core.good()))
    assert d.state is State.BIND_REACHING and d.connects == 2
    d.advance(5)
    assert d.upstream_closed is True  # the attempt is given up
    assert messages.decode_result(d.client[0]) == (52, "", "directory unavailable")
    assert d.closed_for("bind_timeout")
    assert d.events[("upstream_error", "connect_failed")] == 2


def test_a_bind_answered_in_time_stops_its_timer() -> None:
    d = make(bind_timeout=5).start()
    d.send(bind(2, ALICE, d.core.good()))
    assert Timer.BIND in d.timers
    d.decide()
    d.answer(bind_response(2))
    assert d.result().code == 0 and d.timers == {}
    d.advance(10)
    assert not d.session.closed


# -------------------------------------------------------------- the directory lost, the client gone


def test_upstream_lost_mid_bind_closes_both_and_counts_the_bind() -> None:
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    d.run(d.session.upstream_lost("connection_lost"))
    assert d.abandoned == 1 and d.core.turns_held == 0
    assert d.closed_for("upstream_lost")
    assert messages.decode_result(d.client[-1]) == (52, "", "directory connection lost")
    assert d.events[("upstream_error", "connection_lost")] == 1
    assert d.events[("bind", "reject", "directory_unavailable")] == 1
    assert d.session.upstream.link is Link.DOWN


def test_upstream_lost_during_the_reset_counts_the_answer_it_would_have_had() -> None:
    d = bound_as_alice()
    d.send(bind(5, ALICE, "nope," + d.core.code()))  # a right code: the session bind checks
    d.decide()
    d.answer(bind_response(5, ResultCode.INVALID_CREDENTIALS))
    assert d.state is State.RESETTING
    d.run(d.session.upstream_lost("connection_lost"))
    assert d.closed_for("upstream_lost")
    assert d.events[("bind", "reject", "bad_password")] == 1


def test_the_directory_s_own_notice_is_relayed_instead_of_ours() -> None:
    d = make().start()
    notice = messages.encode_notice_of_disconnection(52, "shutting down")
    d.answer(notice)
    d.run(d.session.upstream_lost("connection_lost"))
    assert d.read() == [notice] and d.session.closed and d.client_closed


def test_a_decision_after_the_client_left_is_counted_and_sends_nothing() -> None:
    d = make().start()
    d.send(bind(2, user_dn("mallory"), "guess,000000"))
    d.run(d.session.connection_lost())
    assert d.session.closed and not d.client_closed  # nothing to close: it is gone
    d.decide()
    assert d.events[("bind", "reject", "unknown_user")] == 1
    assert d.upstream == [] and d.client == []
    d.send(bind(3, ALICE, d.core.good()))
    assert d.asks == []  # a closed session reads nothing


def test_a_password_check_after_the_client_left_binds_nothing_and_is_given_back() -> None:
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.run(d.session.connection_lost())
    d.decide()
    assert d.upstream == [] and d.abandoned == 1 and d.core.turns_held == 0
    assert d.events[("bind", "reject", "directory_unavailable")] == 1


def test_the_client_gone_while_the_core_finishes_counts_its_decision() -> None:
    d = make(auto_finish=False).start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    d.answer(bind_response(2))
    d.run(d.session.connection_lost())
    assert d.session.closed and d.core.turns_held == 0
    d.finish()  # an accept for a session that is gone: counted as the directory's loss
    assert d.events[("bind", "reject", "directory_unavailable")] == 1 and d.client == []


def test_a_core_failure_is_the_directory_s_52() -> None:
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.asks.clear()
    d.run(d.session.core_failed(DirectoryUnavailable("down")))
    assert d.result() == (52, "", "directory unavailable")
    assert not d.session.closed


def test_an_unexpected_core_failure_is_an_internal_error_answer() -> None:
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.asks.clear()
    d.run(d.session.core_failed(ZeroDivisionError()))
    assert d.result() == (80, "", "internal error")
    assert d.events[("bind", "reject", "internal_error")] == 1


def test_an_accept_without_an_entry_is_an_internal_error() -> None:
    d = make().start()
    d.send(bind(2, ALICE, d.core.good()))
    d.asks.clear()
    d.run(d.session.core_decided(Decision(Outcome.ACCEPT, Reason.OK, "alice")))
    assert d.result().code == ResultCode.OTHER
    assert [line.level for line in d.logs] == ["error"]
    assert d.upstream == []


class ElsewhereDirectory(MemoryDirectory):
    """Resolves every name to an entry with the DN ``dn``."""

    def __init__(self, dn: str) -> None:
        super().__init__()
        self.dn = dn

    def lookup(self, username: str) -> Any:
        return super().lookup(username).addCallback(
            lambda found: found and replace(found, dn=self.dn))


def test_an_entry_outside_user_base_is_refused_without_its_password_check() -> None:
    core = RealCore(ElsewhereDirectory("uid=alice,ou=admins,dc=example,dc=org"))
    _cores.append(core)
    d = make(core, user_base="ou=people,dc=example,dc=org").start()
    d.send(bind(2, "alice@example.org", d.core.good()))  # not a DN: the core resolves it
    d.decide()
    assert d.result().code == 49 and d.upstream == []
    assert d.events[("bind", "reject", "outside_user_base")] == 1
    assert d.abandoned == 1 and d.core.turns_held == 0 and d.core.failures("alice") == 0
    assert d.abandon_reasons == [Reason.OUTSIDE_USER_BASE]  # audited as what it is


def test_an_entry_outside_user_base_with_a_failing_code_gets_no_password_check_at_all() -> None:
    core = RealCore(ElsewhereDirectory("uid=alice,ou=admins,dc=example,dc=org"))
    _cores.append(core)
    d = make(core, user_base="ou=people,dc=example,dc=org").start()
    d.send(bind(2, "alice@example.org", "alice-pw,000000"))
    d.decide()
    assert d.result().code == 49 and d.upstream == []
    assert core.directory.checks == [] and d.checked_in_core == 0  # nobody's bind
    assert d.abandon_reasons == [Reason.OUTSIDE_USER_BASE]
    assert core.failures("alice") == 0 and core.turns_held == 0


def test_an_accept_after_the_core_s_own_check_is_never_answered_as_a_bind() -> None:
    """Defence in depth: the session was not bound by a check the core made
    itself, so a success from it (a bug) must not reach the client as one."""
    d = make(auto_finish=False).start()
    d.send(bind(2, ALICE, "alice-pw,000000"))
    d.decide()
    assert d.state is State.BIND_FINISHING and d.checked_in_core == 1
    accept = Decision(Outcome.ACCEPT, Reason.OK, "alice", Identity("alice", ALICE))
    d.run(d.session.core_decided(accept))
    assert d.result().code != 0 and not d.session.authenticated
    assert any("without its password check" in line.text for line in d.logs)


def test_a_cached_entry_refused_and_found_again_is_a_wrong_password() -> None:
    core = RealCore(CachingDirectory())
    _cores.append(core)
    d = make(core).start()
    d.send(bind(2, ALICE, "nope," + core.code()))
    d.decide()
    assert d.core.checks[0].identity.from_cache
    d.answer(bind_response(2, ResultCode.INVALID_CREDENTIALS))
    d.answer(bind_response(2))  # the reset
    assert d.result() == (49, "", CREDENTIALS)
    assert core.directory.forgotten[0] == ALICE.casefold()  # looked up again, not from the cache
    assert core.failures("alice") == 1 and core.turns_held == 0


def test_a_cached_entry_deleted_since_is_nobody_and_counts_nothing() -> None:
    core = RealCore(CachingDirectory())
    _cores.append(core)
    d = make(core).start()
    d.send(bind(2, ALICE, core.good()))  # the right code: a deleted entry's bind fails anyway
    d.decide()
    core.directory.deleted.add("alice")  # gone from the directory, still in the cache
    d.answer(bind_response(2, ResultCode.INVALID_CREDENTIALS))
    d.answer(bind_response(2))
    assert d.result() == (49, "", CREDENTIALS)  # what a wrong password reads
    assert core.failures("alice") == 0 and core.turns_held == 0
    assert d.events[("bind", "reject", "unknown_user")] == 1


def test_a_password_check_without_a_dn_is_an_internal_error() -> None:
    core = RealCore(ElsewhereDirectory(""))
    _cores.append(core)
    d = make(core).start()
    d.send(bind(2, "alice@example.org", d.core.good()))
    d.decide()
    assert d.result().code == ResultCode.OTHER and d.upstream == []
    assert [line.level for line in d.logs] == ["error"]
    assert d.abandoned == 1 and d.core.turns_held == 0


# ---------------------------------------------------------------- the rest of the protocol


def test_the_core_is_asked_with_the_bind_as_the_client_sent_it() -> None:
    d = make().start()
    credential = d.core.good()
    d.send(bind(2, ALICE, credential))
    (request,) = d.asks
    assert (request.username, request.bind_dn, request.password, request.source) == (
        ALICE, ALICE, credential, "10.0.0.7")
    d.decide()
    assert d.upstream_binds() == [(2, ALICE, b"alice-pw")]


def test_sasl_is_refused_and_logged_at_most_once_a_minute() -> None:
    d = make().start()
    d.send(messages.ldap_message(2, ber.tlv(messages.BIND_REQUEST, ber.integer(3) + ber.tlv(
        0x04, b"") + ber.tlv(0xA3, ber.tlv(0x04, b"PLAIN")))))
    assert d.result().code == 7
    assert [line.limit_key for line in d.logs] == ["sasl 10.0.0.7"]


def test_start_tls_is_answered_here() -> None:
    d = make(start_tls=True).start()
    d.send(messages.encode_extended_request(3, messages.START_TLS_OID))
    (response,) = d.read()
    assert messages.decode_result(response).code == 0 and d.tls_started
    assert d.upstream == []
    d.send(messages.encode_extended_request(4, messages.START_TLS_OID))
    assert d.result() == (1, "", "TLS already started")


def test_start_tls_with_operations_outstanding_is_refused() -> None:
    d = make(start_tls=True, require_bind=False).start()
    d.send(search(2))
    d.send(messages.encode_extended_request(3, messages.START_TLS_OID))
    assert d.result() == (1, "", "operations outstanding") and not d.tls_started


def test_unbind_is_forwarded_and_closes_the_client_only() -> None:
    d = make().start()
    unbind = messages.ldap_message(3, b"\x42\x00")
    d.send(unbind)
    assert d.upstream == [unbind] and d.client_closed and d.client == []
    assert d.upstream_closed is None  # it closes with the client's connection


def test_idle_timeout_waits_for_outstanding_operations() -> None:
    d = make(idle_timeout=60, require_bind=False).start()
    d.send(search(2))
    d.advance(120)
    assert not d.session.closed
    d.answer(done(2))
    d.advance(59)
    assert not d.session.closed
    d.advance(61)
    assert d.closed_for("idle_timeout")


def test_unbound_timeout_waits_for_the_bind_in_progress_and_its_answer() -> None:
    d = make(unbound_timeout=10).start()
    d.advance(9)
    d.send(bind(2, ALICE, "nope," + d.core.code()))
    d.advance(2)
    assert not d.session.closed  # decided by the bind's answer
    d.decide()
    d.answer(bind_response(2, ResultCode.INVALID_CREDENTIALS))  # the password check
    d.answer(bind_response(2))  # the reset
    bind_answer, notice = d.client
    assert messages.decode_result(bind_answer).code == 49 and is_notice(notice)
    assert d.events[("dropped", "unbound_timeout")] == 1


def test_a_successful_bind_stops_the_unbound_timer() -> None:
    d = make(unbound_timeout=10).start()
    d.send(bind(2, ALICE, d.core.good()))
    d.decide()
    d.answer(bind_response(2))
    assert Timer.UNBOUND not in d.timers
    d.advance(20)
    assert not d.session.closed


def test_partial_messages_count_against_the_shared_buffer_budget() -> None:
    d = make(max_buffered_bytes=1_000, max_message_size=1_000, require_bind=False).start()
    other = d.sibling().start()  # another connection of the same factory
    announced = b"\x30\x82\x03\x84" + b"\x02\x01\x02"  # a 900-byte message, its start
    d.send(announced + b"\x00" * 300)
    assert d.factory.buffered_bytes == d.session.buffered == 307
    other.send(announced + b"\x00" * 700)  # would push the total past 1,000
    assert other.closed_for("buffer_limit")
    assert messages.decode_result(other.client[-1]).code == ResultCode.BUSY
    assert other.session.buffered == 0 and d.factory.buffered_bytes == 307
    d.run(d.session.connection_lost())  # a session that ends gives its share back
    assert d.factory.buffered_bytes == 0


def test_whole_messages_cost_nothing_of_the_budget() -> None:
    d = make(max_buffered_bytes=1_000, max_message_size=1_000, require_bind=False).start()
    d.send(*(search(i) for i in range(2, 60)))  # far more than 1,000 bytes, all whole
    assert not d.session.closed and d.factory.buffered_bytes == 0
    assert len(d.upstream) == 58


# ------------------------------------------------------------- the invariants, for any interleaving


KINDS = ("search", "search", "whoami", "unknown_extended", "bind_good", "bind_good",
         "bind_good", "bind_wrong_code", "bind_wrong_password", "bind_empty", "bind_exempt",
         "bind_exempt_wrong", "abandon", "abandon")  # (repeated: more likely)
PASSES = {"bind_good": ALICE, "bind_exempt": SVC}  # the binds that may succeed, and as whom
VALID = {(ALICE, b"alice-pw"), (SVC, b"svc-secret"), ("", b"")}  # what the directory accepts
OUTCOMES = ("refused", "unavailable", "wrong_type", "malformed")
# Hypothesis favours the ends of a range, so the rare choices sit in the middle:
# 17: ID 0; 18: an ID in use; 19-21: ID 1-3 (in use or not); else a fresh one.
MESSAGE_IDS = st.integers(0, 39)
CHANCE = st.integers(0, 19)  # what ends a session, or answers wrongly, happens on RARE only
RARE = 7
_MODEL_CORE: list[RealCore] = []


def model_core() -> RealCore:
    """One real core for every example (a core costs a database); it never locks."""
    if not _MODEL_CORE:
        _MODEL_CORE.append(RealCore(max_failures=10**9))
    return _MODEL_CORE[0]


@pytest.fixture(scope="module", autouse=True)
def _close_the_model_core() -> Any:
    yield
    while _MODEL_CORE:
        _MODEL_CORE.pop().close()


def is_open(model: SessionModel) -> bool:
    return not model.d.session.closed


class SessionModel(RuleBasedStateMachine):
    """Random client segments, directory answers in any order (some of them
    wrong), core decisions, timeouts and losses, fed straight to the session;
    once it closes (and whatever was late has come), a new one.

    The directory here is worse than slapd on purpose: a failed bind leaves it
    bound as before, so only the proxy's reset makes it anonymous. Checked on
    every action the session takes, in order: no operation reaches the
    directory while a bind of the proxy's is there, nor as anyone but who the
    client was last told it is; a bind goes upstream only when no request is
    outstanding there; a failed bind is answered (on a session that stays
    open) only while the directory is anonymous; a bind passes only with
    password and code (or as exempt); the directory never holds two requests
    with one ID. Checked after every event: the session closes exactly when
    the client reuses an ID in use (or sends ID 0), and when the directory
    answers what was not asked; its IDs in use are the client's; once closed
    it does nothing more (but give back a password check that comes late) and
    holds nothing; the core's turn for alice is held
    only while her password check is at the directory, and never once the
    session has closed (the core's start and finish answer when the model
    says, possibly late)."""

    def __init__(self) -> None:
        super().__init__()
        self.connect()

    def connect(self) -> None:
        self.d = Driver(model_core(), require_bind=False, bind_timeout=30, auto_finish=False)
        self.d.start()
        self.seen = 0  # actions already followed
        self.identity = ""  # as whom the directory's session is bound
        self.told = ""  # as whom the client was last told it is bound
        self.at_directory: dict[int, tuple[str, str, bytes]] = {}  # ID -> (kind, name, password)
        self.sent_kind: dict[int, str] = {}  # the client's last request with each ID
        self.client_in_use: set[int] = set()  # sent, final answer not yet received
        self.next_id = 10

    def teardown(self) -> None:
        """The example ends: the client leaves (the core is shared by every example,
        so a password check still at the directory is given back)."""
        self.d.run(self.d.session.connection_lost())
        while self.d.finishing:
            self.d.finish()
        assert self.d.core.turns_held == 0

    # -- following what the session did, action by action

    def follow(self, was_closed: bool) -> None:
        actions = self.d.actions[self.seen:]
        self.seen = len(self.d.actions)
        if was_closed:  # nothing, but give back a password check the core hands it late
            assert [do for do, _ in actions if do is not Do.ABANDON_CHECK] == [], \
                "a closed session acted"
        for do, argument in actions:
            if do is Do.SEND_UPSTREAM:
                self.directory_got(argument)
            elif do is Do.SEND_CLIENT:
                for message in argument:
                    self.client_got(message)
        assert self.d.events[("dropped", "internal_error")] == 0

    def directory_got(self, message: bytes) -> None:
        header = messages.peek(message)
        tag, message_id = header.op_tag, header.message_id
        if tag == messages.UNBIND_REQUEST:
            return
        if tag == messages.ABANDON_REQUEST:
            target = messages.abandoned_message_id(message, header)
            if target in self.at_directory and self.at_directory[target][0] != "bind":
                del self.at_directory[target]  # dropped by the directory: never answered
                self.client_in_use.discard(target)  # the proxy freed its ID
            return
        assert message_id not in self.at_directory, f"ID {message_id} twice at the directory"
        if tag == messages.BIND_REQUEST:
            assert not self.at_directory, "a bind went upstream with requests outstanding"
            request = messages.decode_bind_request(message)
            self.at_directory[message_id] = ("bind", request.name, request.password or b"")
            return
        assert not any(kind == "bind" for kind, _, _ in self.at_directory.values()), \
            f"operation {message_id} sent while the proxy's bind is upstream"
        assert self.identity == self.told, (
            f"operation {message_id} ran as {self.identity!r}; the client was told {self.told!r}")
        self.at_directory[message_id] = (self.sent_kind[message_id], "", b"")

    def client_got(self, message: bytes) -> None:
        header = messages.peek(message)
        message_id, tag = header.message_id, header.op_tag
        if message_id == 0:
            assert is_notice(message)
            return
        if tag in messages.FINAL_RESPONSES:
            self.client_in_use.discard(message_id)
        if tag != messages.BIND_RESPONSE:
            return
        kind = self.sent_kind[message_id]
        if messages.decode_result(message).code == 0:
            assert kind in PASSES, f"{kind} {message_id} passed"
            self.told = PASSES[kind]
            assert self.identity == self.told
        else:
            self.told = ""
            if not self.d.session.closed:  # invariant 4 (or 52, then the session closes)
                assert self.identity == "", f"{kind} refused while bound as {self.identity!r}"
                assert not self.at_directory

    # -- the client

    @precondition(is_open)
    @rule(ops=st.lists(st.tuples(st.sampled_from(KINDS), MESSAGE_IDS, st.integers(1, 12)),
                       min_size=1, max_size=3))
    def client_sends(self, ops: list[tuple[str, int, int]]) -> None:
        reused = False
        taken = set(self.client_in_use)
        data = []
        for kind, choice, target in ops:
            message_id = self.message_id(choice, taken)
            reused = reused or message_id in taken or message_id == 0
            if kind == "abandon":  # no response: its ID is never taken
                data.append(abandon(message_id, self.abandoned(target)))
                continue
            taken.add(message_id)
            self.sent_kind[message_id] = kind
            data.append(self.request(kind, message_id))
        self.client_in_use = taken
        self.d.send(*data)
        self.follow(False)
        assert self.d.session.closed == reused, (ops, taken)
        if not reused:
            assert self.d.session.in_use == self.client_in_use

    def message_id(self, choice: int, taken: set[int]) -> int:
        if choice == 17:
            return 0
        if choice == 18 and taken:
            return sorted(taken)[0]
        if 19 <= choice <= 21:
            return choice - 18
        self.next_id += 1
        return self.next_id

    def abandoned(self, choice: int) -> int:
        """Mostly something at the directory; or the ID of a request later in the
        same segment (not forwarded yet); or an ID that may be anything."""
        if choice < 8 and self.at_directory:
            return sorted(self.at_directory)[choice % len(self.at_directory)]
        if choice in (8, 9):
            return self.next_id + 1
        return 1 + choice % 3

    def request(self, kind: str, message_id: int) -> bytes:
        if kind == "search":
            return search(message_id)
        if kind == "whoami":
            return whoami(message_id)
        if kind == "unknown_extended":
            return messages.encode_extended_request(message_id, UNKNOWN_OID)
        name, password = {
            "bind_good": (ALICE, self.d.core.good()),
            "bind_wrong_code": (ALICE, "alice-pw,000000"),
            "bind_wrong_password": (ALICE, "nope,123456"),
            "bind_empty": (ALICE, ""),
            "bind_exempt": (SVC, "svc-secret"),
            "bind_exempt_wrong": (SVC, "nope"),
        }[kind]
        return bind(message_id, name, password)

    @precondition(is_open)
    @rule(chance=CHANCE)
    def client_leaves(self, chance: int) -> None:
        if chance == RARE:
            self.d.run(self.d.session.connection_lost())
            self.follow(False)
            assert self.d.session.closed

    @precondition(lambda self: self.d.session.closed)
    @rule()
    def next_connection(self) -> None:
        self.connect()

    # -- the core and the clock (both may come late, after a close)

    @precondition(lambda self: bool(self.d.asks))
    @rule()
    def core_decides(self) -> None:
        was_closed = self.d.session.closed
        self.d.decide()
        self.follow(was_closed)

    @precondition(lambda self: bool(self.d.finishing))
    @rule()
    def core_finishes(self) -> None:
        was_closed = self.d.session.closed
        self.d.finish()
        self.follow(was_closed)

    @rule(seconds=CHANCE.map(lambda i: 31.0 if i == RARE else 1.0 + i % 3))
    def time_passes(self, seconds: float) -> None:
        was_closed = self.d.session.closed
        self.d.advance(seconds)
        self.follow(was_closed)

    # -- the directory (its answers too)

    @precondition(lambda self: bool(self.at_directory))
    @rule(pick=st.integers(0, 10), outcome=st.sampled_from(OUTCOMES), chance=CHANCE)
    def directory_answers(self, pick: int, outcome: str, chance: int) -> None:
        """The answer to one request at the directory (in any order): right, or
        on RARE a refusal, a failure, the wrong type, a malformed result."""
        message_id = sorted(self.at_directory)[pick % len(self.at_directory)]
        kind, name, password = self.at_directory.pop(message_id)
        wrong = outcome if chance == RARE else "ok"
        if kind != "bind":
            answer = done(message_id) if kind == "search" else messages.encode_extended_response(
                message_id, 0 if kind == "whoami" else ResultCode.PROTOCOL_ERROR)
            if wrong == "wrong_type":
                answer = bind_response(message_id)  # a BindResponse nobody asked for
        elif wrong == "wrong_type":
            answer = done(message_id)  # the right ID, the wrong type (invariant 3)
        elif wrong == "malformed":
            answer = b"\x30\x05\x02\x01" + bytes([message_id % 128]) + b"\x61\x00"
        elif wrong == "ok" and (name, password) in VALID:
            answer = bind_response(message_id)
            self.identity = name
        else:  # refused, unavailable, or a wrong password: the session stays as it was
            answer = bind_response(message_id, 52 if wrong == "unavailable" else 49)
        was_closed = self.d.session.closed
        self.d.answer(answer)
        self.follow(was_closed)
        if wrong == "wrong_type" and not was_closed:
            assert self.d.session.closed
            assert self.d.events[("dropped", "upstream_protocol_violation")] == 1

    @precondition(lambda self: is_open(self) and not self.at_directory)
    @rule(chance=CHANCE)
    def directory_answers_what_nobody_asked(self, chance: int) -> None:
        if chance == RARE:
            self.d.answer(bind_response(3))
            self.follow(False)
            assert self.d.session.closed

    @precondition(is_open)
    @rule(chance=CHANCE)
    def directory_lost(self, chance: int) -> None:
        if chance == RARE:
            self.d.run(self.d.session.upstream_lost("connection_lost"))
            self.follow(False)
            assert self.d.session.closed

    @invariant()
    def the_actions_tell_the_session_s_own_story(self) -> None:
        session = self.d.session
        assert set(self.d.timers) == session.timers  # every timer started is cancelled or fired
        if session.closed:
            assert self.d.timers == {} and session.queued == 0 and session.buffered == 0
        else:
            assert self.d.paused == session.paused == (session.queued > 0)

    @invariant()
    def the_core_s_turn_is_held_only_for_a_password_check_at_the_directory(self) -> None:
        core = self.d.core
        held = sum(not check.ended for check in core.checks)
        assert core.turns_held == held
        checking = self.d.session.state is State.BIND_UPSTREAM and any(
            kind == "bind" and name == ALICE for kind, name, _ in self.at_directory.values())
        assert held == (1 if checking else 0)


TestSessionModel = SessionModel.TestCase
TestSessionModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
