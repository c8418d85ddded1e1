"""The lockout holds under concurrency, and a replayed packet is not a new attempt.

PRODUCT.md: "once ``max_failures`` is reached, no concurrent attempt for that
identity is accepted or challenged", and "a RADIUS retransmission (same
packet) is answered from the duplicate cache, not re-decided".

Each test runs its own ``mfa-proxy serve`` (``max_failures = 5``, the session
slapd as directory and LDAP upstream; alice enrolled, bob never required)
and fires 51 attempts at once (threads released together by a barrier, each
with its own socket): 50 wrong passwords and the right one.  Replies are
collected with bounded timeouts.  The proof is the audit trail: after a
clean stop (which flushes the audit queue) the ``audit`` rows of the user
are walked in id order with a consecutive-failure counter (reset by an
accept); once it reaches ``max_failures`` every later row must be a
``reject``/``locked_out`` -- no ``accept``, no ``challenge``, no
``bad_password`` (which would mean the directory was asked again).  At most
one attempt is accepted, and the final state is locked unless the walk
ends below the limit.  No assertion depends on timing.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration.proxyproc import Datagrams, ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, user_dn, user_password
from tests.integration.test_identity_attacks import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    ALICE,
    ALICE_PW,
    FAILURE_REASONS,
    MAX_FAILURES,
    PERIOD,
    WINDOW,
    Codes,
    LdapClient,
    LdapResult,
    configure_target,
    totp_key,
)

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")

BOB = "bob"  # in the directory, never required: password only
ATTACKERS = 50  # wrong passwords sent at once with the right one
RACE_TIMEOUT = 60.0  # seconds for every racer to have its answer
REPLY_TIMEOUT = 30.0  # one RADIUS or LDAP answer
MESSAGE_AUTHENTICATOR = 80


@pytest.fixture
def proxy(slapd: Slapd, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A running proxy of the test's own: RADIUS "nas" (append, 127.0.0.1) and
    "chal" (challenge, 127.0.0.4), LDAP relaying to slapd; alice and carol enrolled."""
    process = configure_target(slapd, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()  # a no-op when the test already stopped it


# ---------------------------------------------------------------- racing


def race(jobs: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run every job in its own thread, released together; results in job order
    (an exception in place of a result).  Bounded: every thread must end within
    RACE_TIMEOUT."""
    barrier = threading.Barrier(len(jobs))
    results: list[T | BaseException | None] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=RACE_TIMEOUT)
            results[i] = jobs[i]()
        except BaseException as e:  # reported with the results
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"racer-{i}", daemon=True)
               for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RACE_TIMEOUT + REPLY_TIMEOUT
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"racers still waiting for an answer: {stuck}"
    return [r if r is not None else RuntimeError("no result") for r in results]


def shuffled(wrong: int, right: str, seed: int) -> tuple[list[str], int]:
    """``wrong`` wrong passwords with ``right`` somewhere among them (a fixed place
    per seed); (passwords, index of the right one)."""
    passwords = [f"wrong-password-{i}" for i in range(wrong)]
    at = random.Random(seed).randrange(wrong + 1)
    passwords.insert(at, right)
    return passwords, at


def radius_jobs(proxy: ProxyProcess, client: str, source: str, user: str,
                passwords: Sequence[str]) -> tuple[list[Callable[[], Any]], list[Datagrams]]:
    """One UDP socket of its own and one prepared Access-Request (pyrad-encoded, with
    Message-Authenticator) per password; a job returns the verified reply packet.

    (Not pyrad's Client: it sets SO_REUSEADDR, and Linux may then give two
    sockets bound to port 0 the same port -- a reply would go to the wrong one.)
    """
    encoder = pyrad_client(proxy, client, source)
    jobs: list[Callable[[], Any]] = []
    sockets: list[Datagrams] = []
    for password in passwords:
        request = encoder.CreateAuthPacket(User_Name=user)
        request["User-Password"] = request.PwCrypt(password)
        datagram = request.RequestPacket()
        nas = Datagrams(proxy.radius_port, source)
        jobs.append(partial(verified_reply, nas, request, datagram))
        sockets.append(nas)
    return jobs, sockets


def verified_reply(nas: Datagrams, request: Any, datagram: bytes) -> Any:
    answer = nas.exchange(datagram, timeout=REPLY_TIMEOUT)
    if answer is None:
        raise TimeoutError(f"no answer to Access-Request id {datagram[1]}")
    reply = request.CreateReply(packet=answer)
    if not request.VerifyReply(reply, answer, enforce_ma=True):
        raise AssertionError(f"invalid reply to Access-Request id {datagram[1]}")
    return reply


def ldap_jobs(proxy: ProxyProcess, dn: str, passwords: Sequence[str]
              ) -> tuple[list[Callable[[], LdapResult]], list[LdapClient]]:
    """One connected LDAP session per password (connected before the race)."""
    connections = [LdapClient(proxy.ldap_port, timeout=REPLY_TIMEOUT) for _ in passwords]
    jobs: list[Callable[[], LdapResult]] = [
        partial(c.bind, dn, p) for c, p in zip(connections, passwords, strict=True)]
    return jobs, connections


def answered(results: Sequence[T | BaseException]) -> list[T]:
    failed = [f"{i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not failed, "attempts without an answer:\n  " + "\n  ".join(failed)
    return [r for r in results if not isinstance(r, BaseException)]


# ---------------------------------------------------------------- the audit trail


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: int
    username: str
    protocol: str
    client: str
    source: str
    result: str
    reason: str


def audit_rows(proxy: ProxyProcess, user: str) -> list[AuditRow]:
    """The user's audit rows in id order (the proxy must be stopped: the final flush).

    A row is the user's when its username is the user's name or entry DN, in any case.
    """
    assert not proxy.alive, "stop the proxy first: the audit queue is flushed on exit"
    with closing(sqlite3.connect(proxy.state_path, timeout=30)) as db:
        rows = [AuditRow(*row) for row in db.execute(
            "SELECT id, at, username, protocol, client, source, result, reason "
            "FROM audit ORDER BY id")]
    names = {user.casefold(), user_dn(user).casefold()}
    return [r for r in rows if r.username.casefold() in names]


def walk(rows: Sequence[AuditRow], max_failures: int = MAX_FAILURES) -> tuple[list[str], int]:
    """(violations, consecutive failures at the end): once the counter reaches
    ``max_failures`` every later row must be reject/locked_out."""
    failures, violations = 0, []
    for row in rows:
        if failures >= max_failures:
            if (row.result, row.reason) != ("reject", "locked_out"):
                violations.append(f"row {row.id}: {row.protocol} {row.result}/{row.reason} "
                                  f"after {failures} consecutive failures (locked)")
            continue
        if row.result == "accept":
            failures = 0
        elif row.result == "reject" and row.reason in FAILURE_REASONS:
            failures += 1
    return violations, failures


def trail(rows: Sequence[AuditRow]) -> str:
    """The rows as "ids protocol result/reason", runs of the same outcome in one line."""
    lines: list[tuple[int, int, str]] = []
    for r in rows:
        what = f"{r.protocol} {r.result}/{r.reason}"
        if lines and lines[-1][2] == what:
            lines[-1] = (lines[-1][0], r.id, what)
        else:
            lines.append((r.id, r.id, what))
    return "\n  ".join(f"{a}{f'-{b}' if b != a else ''} {what}" for a, b, what in lines)


def assert_lock_held(proxy: ProxyProcess, user: str, attempts: int, accepted: int) -> None:
    """The walk over the user's audit trail finds no attempt beating the lock; at most
    one accept (and as many as the clients heard); the final state follows the walk."""
    rows = audit_rows(proxy, user)
    assert len(rows) == attempts, (f"{len(rows)} audit rows for {user}, {attempts} attempts:"
                                   f"\n  {trail(rows)}")
    violations, failures = walk(rows)
    assert not violations, (f"{len(violations)} attempt(s) beat the lock, first:\n  "
                            + "\n  ".join(violations[:5]) + f"\nthe trail:\n  {trail(rows)}")
    accepts = [r for r in rows if r.result == "accept"]
    assert len(accepts) <= 1, f"{len(accepts)} accepts:\n  {trail(rows)}"
    assert len(accepts) == accepted, (f"clients heard {accepted} accept(s), the audit says "
                                      f"{len(accepts)}")
    shown = proxy.user(user)  # the CLI reads the state without the process
    assert shown["locked"] is (failures >= MAX_FAILURES), (shown, f"\n  {trail(rows)}")


# ---------------------------------------------------------------- D: the races


def test_parallel_wrong_passwords_over_radius_never_beat_the_lock(proxy: ProxyProcess) -> None:
    passwords, _ = shuffled(ATTACKERS, user_password(BOB), seed=1)
    jobs, sockets = radius_jobs(proxy, "nas", "127.0.0.1", BOB, passwords)
    try:
        replies = answered(race(jobs))
    finally:
        for nas in sockets:
            nas.close()
    codes = [r.code for r in replies]
    assert set(codes) <= {ACCESS_ACCEPT, ACCESS_REJECT}, codes
    proxy.stop()
    assert_lock_held(proxy, BOB, len(passwords), codes.count(ACCESS_ACCEPT))


@pytest.mark.parametrize("user", [BOB, ALICE], ids=["password-only", "enrolled"])
def test_parallel_wrong_passwords_over_ldap_never_beat_the_lock(
        proxy: ProxyProcess, user: str) -> None:
    right = user_password(user)
    if user == ALICE:
        right = f"{ALICE_PW},{Codes(totp_key(ALICE), window=1).fresh()}"
    passwords, _ = shuffled(ATTACKERS, right, seed=2)
    jobs, connections = ldap_jobs(proxy, user_dn(user), passwords)
    try:
        results = answered(race(jobs))
    finally:
        for c in connections:
            c.close()
    codes = [r.code for r in results]
    assert set(codes) <= {0, 49}, codes
    proxy.stop()
    assert_lock_held(proxy, user, len(passwords), codes.count(0))


def test_parallel_wrong_passwords_in_challenge_mode_never_get_a_challenge_after_the_lock(
        proxy: ProxyProcess) -> None:
    """Challenge mode: the right password alone earns an Access-Challenge -- unless
    the lock came first.  A challenge that did come is answered with a fresh code
    after the race: by then the user is locked, so it must be refused too."""
    passwords, right_at = shuffled(ATTACKERS, ALICE_PW, seed=3)
    jobs, sockets = radius_jobs(proxy, "chal", "127.0.0.4", ALICE, passwords)
    try:
        replies = answered(race(jobs))
    finally:
        for nas in sockets:
            nas.close()
    codes = [r.code for r in replies]
    assert set(codes) <= {ACCESS_REJECT, ACCESS_CHALLENGE}, codes
    attempts, accepted = len(passwords), 0
    challenge = replies[right_at]
    if challenge.code == ACCESS_CHALLENGE:
        state = challenge["State"][0]
        code = Codes(totp_key(ALICE), window=1).fresh()
        answer = pyrad_auth(pyrad_client(proxy, "chal", "127.0.0.4"), ALICE, code, state=state)
        attempts += 1
        accepted = int(answer.code == ACCESS_ACCEPT)
    proxy.stop()
    assert_lock_held(proxy, ALICE, attempts, accepted)


def test_parallel_wrong_passwords_over_both_protocols_never_beat_the_lock(
        proxy: ProxyProcess) -> None:
    """Half the guesses by RADIUS, half by LDAP, the right password by RADIUS: one
    identity, one counter, one lock."""
    passwords, right_at = shuffled(ATTACKERS, user_password(BOB), seed=4)
    by_radius = [p for i, p in enumerate(passwords) if i % 2 == 0 or i == right_at]
    by_ldap = [p for i, p in enumerate(passwords) if i % 2 == 1 and i != right_at]
    r_jobs, sockets = radius_jobs(proxy, "nas", "127.0.0.1", BOB, by_radius)
    l_jobs, connections = ldap_jobs(proxy, user_dn(BOB), by_ldap)
    try:
        results = answered(race([*r_jobs, *l_jobs]))
    finally:
        for nas in sockets:
            nas.close()
        for c in connections:
            c.close()
    radius_codes = [r.code for r in results[:len(r_jobs)]]
    ldap_codes = [r.code for r in results[len(r_jobs):]]
    assert set(radius_codes) <= {ACCESS_ACCEPT, ACCESS_REJECT}, radius_codes
    assert set(ldap_codes) <= {49}, ldap_codes
    proxy.stop()
    assert_lock_held(proxy, BOB, len(passwords), radius_codes.count(ACCESS_ACCEPT))


# ---------------------------------------------------------------- E: replays from new ports


def attribute_types(datagram: bytes) -> list[int]:
    types, pos = [], 20
    while pos + 2 <= len(datagram):
        types.append(datagram[pos])
        pos += max(2, datagram[pos + 1])
    return types


@pytest.mark.parametrize("captured", ["wrong-password", "password-and-code"])
def test_captured_request_replayed_from_new_ports_is_answered_from_the_duplicate_cache(
        proxy: ProxyProcess, captured: str) -> None:
    """An Access-Request (with Message-Authenticator) seen on the wire, sent again
    byte for byte from five new source ports: the same answer, from the duplicate
    cache -- not a new decision, so alice's counter does not move."""
    if captured == "wrong-password":
        password, expected = f"wrong-{ALICE_PW}", ACCESS_REJECT
    else:
        password = f"{ALICE_PW},{Codes(totp_key(ALICE), window=1).fresh()}"
        expected = ACCESS_ACCEPT
    nas = pyrad_client(proxy, "nas")
    request = nas.CreateAuthPacket(User_Name=ALICE)
    request["User-Password"] = request.PwCrypt(password)
    datagram = request.RequestPacket()
    assert MESSAGE_AUTHENTICATOR in attribute_types(datagram)
    with Datagrams(proxy.radius_port) as original:
        first = original.exchange(datagram, timeout=REPLY_TIMEOUT)
    assert first is not None and first[0] == expected, first
    failures = proxy.user(ALICE)["failures"]
    different = []
    for port in range(5):
        with Datagrams(proxy.radius_port) as replayer:  # a new source port each time
            again = replayer.exchange(datagram, timeout=REPLY_TIMEOUT)
        if again != first:
            different.append(f"replay {port + 1}: "
                             f"{'no answer' if again is None else f'code {again[0]}'}"
                             f"{'' if again is None else ' (other bytes)'}")
    after = proxy.user(ALICE)["failures"]
    proxy.stop()
    rows = audit_rows(proxy, ALICE)
    problems = different + ([f"alice's failure counter moved: {failures} -> {after}"]
                            if after != failures else [])
    if len(rows) != 1:
        problems.append(f"{len(rows)} decisions for one request:\n  {trail(rows)}")
    assert not problems, "\n".join(problems)


def test_one_code_raced_over_ldap_on_two_instances_is_accepted_once_and_no_session_stays_bound(
        slapd: Slapd, tmp_path: Path) -> None:
    """Eight LDAP sessions, four on each of two instances sharing one state, bind as
    alice with her password and the same fresh code at once. Each instance finds
    the code unused before the password check, so several sessions are bound by
    that check; one accept wins the code (one conditional UPDATE), and every other
    session is reset to anonymous before its 49: after the race, WhoAmI on each
    refused session says anonymous."""
    # require_bind off: WhoAmI on a refused session goes to slapd, which says who it is.
    a = configure_target(slapd, tmp_path / "a", ldap={"require_bind": False})
    b = ProxyProcess.configure(
        tmp_path / "b", slapd, clients=[{"name": "nas", "address": "127.0.0.1/32"}],
        ldap={"upstream": slapd.url, "exempt": [], "mfa": "enrolled", "separator": ",",
              "require_bind": False},
        state_url=a.state_url, key_file=a.key_file,
        overrides={"policy": {"max_failures": MAX_FAILURES, "lockout_seconds": 900},
                   "totp": {"period": PERIOD, "window": WINDOW}})
    codes_of_alice = Codes(totp_key(ALICE), window=WINDOW)
    with a.running(), b.running():
        for _ in range(3):  # rounds: whether two checks overlap is the scheduler's call
            field = f"{ALICE_PW},{codes_of_alice.fresh()}"
            jobs, connections = [], []
            for proxy in (a, b):
                more_jobs, more = ldap_jobs(proxy, user_dn(ALICE), [field] * 4)
                jobs += more_jobs
                connections += more
            try:
                codes = [r.code for r in answered(race(jobs))]
                assert sorted(codes) == [0] + [49] * 7, codes
                seen = [(result.code, authz)
                        for result, authz in (c.whoami() for c in connections)]
            finally:
                for c in connections:
                    c.close()
            winner = codes.index(0)
            assert seen[winner] == (0, f"dn:{user_dn(ALICE)}")
            assert [s for i, s in enumerate(seen) if i != winner] == [(0, "")] * 7, seen
            a.cli("user", "unlock", ALICE)  # seven replays are seven failures: a lock
