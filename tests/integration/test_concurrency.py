"""Races: many threads, and several processes sharing one database (SQLite file or
PostgreSQL), present the same code at once -- exactly one wins -- or fail at once
-- every failure is counted."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from backends.base import Identity, InvalidCredentials
from policy.decision import AuthRequest, Outcome, Reason
from policy.engine import Limits, PolicyEngine
from policy.keys import KeyRing
from policy.store import Store
from policy.totp import TotpParams, code_for_step, new_totp_key
from policy.usernames import UsernameRules
from tests.clock import ManualClock
from tests.sync_core import authenticate_sync

pytestmark = pytest.mark.timeout(120)

PARAMS = TotpParams(digits=6, period=30, window=1)
T0 = 1_700_000_010.0  # the start of a time step
THREADS = 16
ROUNDS = 5
PROCESSES = 3
PROCESS_ROUNDS = 6
PROCESS_FAILURES = 20
WAIT = 60.0  # seconds: a bound on every barrier and join, never an expectation


class Directory:
    """Everyone exists; the password is NAME-pw."""

    @staticmethod
    def lookup(username: str) -> Identity:
        return Identity(username, f"uid={username}")

    @staticmethod
    def check_password(identity: Identity, password: str) -> Identity:
        if password != f"{identity.username}-pw":
            raise InvalidCredentials(identity.username)
        return identity


verify = Directory()


def make_engine(url: str, key_file: Path, clock: Callable[[], float],
                max_failures: int = 100_000) -> PolicyEngine:
    store = Store(url, clock)
    return PolicyEngine(store, KeyRing(key_file), PARAMS, Limits(max_failures, 900),
                        UsernameRules(), clock=clock)


def request(username: str, secret: str) -> AuthRequest:
    return AuthRequest(username=username, password=secret, protocol="radius", client="vpn")


def enroll(engine: PolicyEngine, username: str) -> str:
    secret = new_totp_key()
    engine.store.admin.require(username, int(T0) + 86400)
    engine.store.admin.set_totp_key(username, engine.keys.encrypt(secret.encode(), username),
                            engine.keys.current)
    return secret


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        u = request.getfixturevalue("postgres").new_database("race")
    s = Store(u)
    s.upgrade()
    s.close()
    return u


@pytest.fixture
def engine(url: str, tmp_path: Path) -> Iterator[PolicyEngine]:
    e = make_engine(url, tmp_path / "secret.key", ManualClock(T0))
    yield e
    e.store.close()


def race(n: int, f: Callable[[], Any]) -> list[Any]:
    """Run f in n threads released at the same instant; return the results."""
    barrier = threading.Barrier(n, timeout=WAIT)

    def run() -> Any:
        barrier.wait()
        return f()

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(run) for _ in range(n)]
        return [fu.result(timeout=WAIT) for fu in futures]


# -- threads --------------------------------------------------------------------------------


def test_threads_same_code_exactly_one_accept(engine: PolicyEngine) -> None:
    secret = enroll(engine, "alice")
    clock = engine.clock
    assert isinstance(clock, ManualClock)
    for r in range(ROUNDS):
        clock.t = T0 + r * PARAMS.period
        code = code_for_step(secret, PARAMS.step_at(clock.t), PARAMS)
        decisions = race(THREADS, lambda c=code: authenticate_sync(engine,
            request("alice", f"alice-pw,{c}"), verify))
        outcomes = Counter((d.outcome, d.reason) for d in decisions)
        assert outcomes == {(Outcome.ACCEPT, Reason.OK): 1,
                            (Outcome.REJECT, Reason.REPLAYED_CODE): THREADS - 1}, r


def test_threads_accept_step_exactly_one(engine: PolicyEngine) -> None:
    store = engine.store
    store.admin.set_totp_key("alice", b"blob", 1)
    for step in range(100, 100 + ROUNDS):
        results = race(32, lambda s=step: store.hot.accept_step("alice", s, T0))
        assert results.count(True) == 1, step
    assert store.admin.get("alice").last_step == 100 + ROUNDS - 1  # type: ignore[union-attr]


def test_threads_racing_failures_are_all_counted(engine: PolicyEngine) -> None:
    enroll(engine, "alice")

    def ten_failures() -> list[Reason]:
        return [authenticate_sync(engine, request("alice", "wrong"), verify).reason
                for _ in range(10)]

    results = race(8, ten_failures)
    assert all(r == [Reason.BAD_PASSWORD] * 10 for r in results)
    assert engine.store.admin.get("alice").failures == 80  # type: ignore[union-attr]


def test_threads_racing_failures_lock_exactly_once(engine: PolicyEngine) -> None:
    store = engine.store

    def ten_failures() -> list[bool]:
        return [store.hot.record_failure("bob", T0, 50, 900).lockout_started for _ in range(10)]

    started = [s for r in race(8, ten_failures) for s in r]
    assert started.count(True) == 1
    rec = store.admin.get("bob")
    assert rec is not None and rec.failures == 80 and rec.locked_until == int(T0) + 900


def test_threads_mixed_users_do_not_interfere(engine: PolicyEngine) -> None:
    names = [f"user{i}" for i in range(8)]
    secrets = {n: enroll(engine, n) for n in names}
    step = PARAMS.step_at(T0)

    def each(i: int) -> Outcome:
        n = names[i % len(names)]
        code = code_for_step(secrets[n], step, PARAMS)
        return authenticate_sync(engine, request(n, f"{n}-pw,{code}"), verify).outcome

    counter = iter(range(10_000))
    lock = threading.Lock()

    def next_index() -> int:
        with lock:
            return next(counter)

    results = race(24, lambda: each(next_index()))
    assert results.count(Outcome.ACCEPT) == len(names)  # one per user


# -- processes ----------------------------------------------------------------------------


def _process_main(url: str, key_file: str, secret: str, rounds: int, barrier: Any,
                  results: Any) -> None:
    """One proxy instance: every round, wait for the others, then present the code."""
    clock = ManualClock(T0)
    engine = make_engine(url, Path(key_file), clock)
    try:
        for r in range(rounds):
            clock.t = T0 + r * PARAMS.period
            code = code_for_step(secret, PARAMS.step_at(clock.t), PARAMS)
            barrier.wait(WAIT)
            d = authenticate_sync(engine, request("alice", f"alice-pw,{code}"), verify)
            results.put(("code", r, d.outcome.value, d.reason.value))
        barrier.wait(WAIT)
        for _ in range(PROCESS_FAILURES):
            d = authenticate_sync(engine, request("bob", "wrong"), verify)
            results.put(("failure", -1, d.outcome.value, d.reason.value))
    finally:
        engine.store.close()


def test_processes_same_code_exactly_one_accept(url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    setup = make_engine(url, key_file, ManualClock(T0))
    secret = enroll(setup, "alice")

    ctx = multiprocessing.get_context("spawn")  # no threads or pools inherited
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [ctx.Process(target=_process_main,
                         args=(url, str(key_file), secret, PROCESS_ROUNDS, barrier, results))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    got: list[tuple[str, int, str, str]] = []
    try:
        expected = PROCESSES * (PROCESS_ROUNDS + PROCESS_FAILURES)
        while len(got) < expected:
            try:
                got.append(results.get(timeout=WAIT))
            except queue.Empty:
                break
    finally:
        for p in procs:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
                p.join(WAIT)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    for r in range(PROCESS_ROUNDS):
        this_round = Counter((o, reason) for kind, rr, o, reason in got
                             if kind == "code" and rr == r)
        assert this_round == {("accept", "ok"): 1,
                              ("reject", "replayed_code"): PROCESSES - 1}, r
    failures = [g for g in got if g[0] == "failure"]
    assert len(failures) == PROCESSES * PROCESS_FAILURES
    assert all(g[3] == "bad_password" for g in failures)
    assert setup.store.admin.get("bob").failures == PROCESSES * PROCESS_FAILURES  # type: ignore[union-attr]
    assert setup.store.admin.get("alice").last_step == (  # type: ignore[union-attr]
        PARAMS.step_at(T0) + PROCESS_ROUNDS - 1)
    setup.store.close()
