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
