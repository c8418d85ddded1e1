"""proxy.worker.BatchWorkers: jobs off the reactor thread, results back in batches."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from proxy.worker import BatchWorkers


class FakeReactor:
    """callFromThread hands the call to the test thread, which runs it (as the reactor would)."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
        self.calls.put((f, args))

    def run_one(self, timeout: float = 5.0) -> None:
        f, args = self.calls.get(timeout=timeout)
        f(*args)


def results_of(deferreds: list[Any]) -> list[Any]:
    out: list[Any] = []
    for d in deferreds:
        d.addBoth(out.append)
    return out


def test_results_come_back_in_order_and_a_failure_is_only_its_own() -> None:
    reactor = FakeReactor()
    workers = BatchWorkers(reactor, 1)
    workers.start()
    try:
        ds = [workers.submit(lambda x: x * 2, 1), workers.submit(lambda: 1 / 0),
              workers.submit(lambda x, y: x + y, 2, 3)]
        got = results_of(ds)
        while len(got) < 3:
            reactor.run_one()
        assert got[0] == 2 and got[2] == 5
        assert got[1].check(ZeroDivisionError)
    finally:
        workers.stop()


def test_jobs_queued_while_the_worker_is_busy_come_back_in_one_hand_over() -> None:
    reactor = FakeReactor()
    workers = BatchWorkers(reactor, 1)
    workers.start()
    gate, started = threading.Event(), threading.Event()
    try:
        def hold() -> str:
            started.set()
            assert gate.wait(5)
            return "held"

        first = results_of([workers.submit(hold)])
        assert started.wait(5)
        rest = results_of([workers.submit(pow, 2, n) for n in range(10)])
        gate.set()
        reactor.run_one()  # the first batch: the held job alone
        assert first == ["held"] and rest == []
        reactor.run_one()  # every job queued meanwhile, in one call
        assert rest == [2 ** n for n in range(10)]
        assert (workers.batches, workers.jobs) == (2, 11)
    finally:
        workers.stop()


@pytest.mark.parametrize("threads", [1, 3])
def test_stop_finishes_what_was_queued_and_ends_every_thread(threads: int) -> None:
    reactor = FakeReactor()
    workers = BatchWorkers(reactor, threads)
    workers.start()
    ds = [workers.submit(lambda n=n: n) for n in range(50)]
    workers.stop(timeout=5)
    assert not any(t.is_alive() for t in workers._threads)
    got = results_of(ds)
    while not reactor.calls.empty():
        reactor.run_one()
    assert sorted(got) == list(range(50))


class Spoiled(Exception):
    """Stands for the store's error: it spoils the whole group."""


class RecordingGroup:
    def __init__(self) -> None:
        self.entered = 0
        self.committed: list[list[Any]] = []
        self.rolled_back = 0
        self.writes: list[Any] = []

    def __call__(self) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def block() -> Any:
            self.entered += 1
            self.writes = []
            try:
                yield
            except BaseException:
                self.rolled_back += 1
                raise
            self.committed.append(self.writes)

        return block()


def run_held(reactor: FakeReactor, workers: BatchWorkers,
             jobs: list[tuple[bool, Any]]) -> list[Any]:
    """Submit ``jobs`` (grouped?, f) while the worker is held, so they form one batch;
    hand both batches back (the holding job's, then theirs) and return their results."""
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        assert gate.wait(5)

    workers.submit(hold)
    assert started.wait(5)
    got = results_of([(workers.submit_grouped if grouped else workers.submit)(f)
                      for grouped, f in jobs])
    gate.set()
    reactor.run_one()
    reactor.run_one()
    return got


@pytest.fixture
def grouped() -> Any:
    reactor, group = FakeReactor(), RecordingGroup()
    workers = BatchWorkers(reactor, 1, group=group, group_errors=(Spoiled,))
    workers.start()
    yield reactor, group, workers
    workers.stop()


def test_grouped_jobs_waiting_together_share_one_group_and_answer_after_it(grouped: Any) -> None:
    reactor, group, workers = grouped

    def write(n: int) -> Any:
        return lambda: group.writes.append(n) or n

    got = run_held(reactor, workers, [(True, write(1)), (True, write(2)),
                                      (False, lambda: "alone"), (True, write(3))])
    assert got == [1, 2, "alone", 3]
    # two groups: the job that may not be grouped splits them
    assert group.committed == [[1, 2], [3]] and group.rolled_back == 0


def test_a_spoiling_error_fails_every_job_of_its_group_and_only_that_group(grouped: Any) -> None:
    reactor, group, workers = grouped

    def spoil() -> None:
        raise Spoiled("database is locked")

    got = run_held(reactor, workers, [(True, lambda: "written"), (True, spoil),
                                      (True, lambda: "never run"), (False, lambda: "alone"),
                                      (True, lambda: "next group")])
    # the first job's write was rolled back with the group: it must not say "done"
    assert [g.check(Spoiled) is not None for g in got[:3]] == [True, True, True]
    assert got[3:] == ["alone", "next group"]
    assert group.rolled_back == 1 and len(group.committed) == 1


THREE_JOBS = [(True, lambda: 1), (True, lambda: 1 / 0), (True, lambda: 3)]


def test_a_jobs_own_error_fails_only_that_job_inside_a_group(grouped: Any) -> None:
    reactor, group, workers = grouped
    got = run_held(reactor, workers, THREE_JOBS)
    assert got[0] == 1 and got[1].check(ZeroDivisionError) and got[2] == 3
    assert len(group.committed) == 1 and group.rolled_back == 0


def test_without_a_group_grouped_jobs_run_alone() -> None:
    reactor = FakeReactor()
    workers = BatchWorkers(reactor, 1)
    workers.start()
    try:
        got = run_held(reactor, workers, THREE_JOBS)
        assert got[0] == 1 and got[1].check(ZeroDivisionError) and got[2] == 3
    finally:
        workers.stop()


def test_a_job_submitted_after_stop_fails_at_once() -> None:
    from proxy.worker import WorkersStopped

    workers = BatchWorkers(FakeReactor(), 1)
    workers.start()
    workers.stop(timeout=5)
    got = results_of([workers.submit(lambda: 1), workers.submit_grouped(lambda: 2)])
    assert all(g.check(WorkersStopped) for g in got)


def test_users_changed_passes_events_on_then_says_so() -> None:
    """serve's portal listener: every account event is passed on (mail), then the
    users-by-status gauge is recounted (proxy/service.py UsersChanged)."""
    from proxy.service import UsersChanged

    seen: list[tuple[str, tuple[object, ...]]] = []
    changed: list[int] = []

    class Mail:
        def setup_confirmed(self, *args: object, **kw: object) -> None:
            seen.append(("setup_confirmed", args))

    events = UsersChanged(Mail(), lambda: changed.append(1))
    events.setup_confirmed("alice", replaced=False)
    events.unlocked("alice")  # the inner listener has no such hook: only the recount
    assert seen == [("setup_confirmed", ("alice",))]
    assert changed == [1, 1]
    UsersChanged(None, lambda: changed.append(1)).enrolled("bob")
    assert changed == [1, 1, 1]


def test_user_gauge_recount_is_soon_and_once(tmp_path: Any) -> None:
    from twisted.internet.task import Clock

    from proxy.service import Service

    service = Service.__new__(Service)
    service.reactor = Clock()
    counted: list[int] = []
    service._refresh_user_gauge = lambda: counted.append(1)  # type: ignore[method-assign]
    service._user_gauge_soon()
    service._user_gauge_soon()
    assert counted == []
    service.reactor.advance(0.2)
    assert counted == [1]
    service._user_gauge_soon()
    service.reactor.advance(0.2)
    assert counted == [1, 1]
