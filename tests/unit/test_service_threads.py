"""serve's background threads yield the CPU to sign-ins (proxy/service.py)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from proxy.service import BACKGROUND_NICE, background_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="a thread's own nice value is Linux's")


def test_background_priority_lowers_only_the_calling_thread() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int | None] = {}

    def worker() -> None:
        seen["returned"] = background_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["nice"] == seen["returned"] == max(mine, BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_a_report_worker_thread_runs_at_background_priority() -> None:
    from twisted.internet.task import Clock

    from proxy.worker import BatchWorkers

    class Reactor(Clock):
        def callFromThread(self, f, *args):  # noqa: N802
            f(*args)

    workers = BatchWorkers(Reactor(), 1, "state-reports")
    workers.start()
    got: list[int | None] = []
    workers.submit(background_priority).addCallback(got.append)
    nice: list[int] = []
    workers.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
                   ).addCallback(nice.append)
    workers.stop(timeout=5)
    assert nice and nice[0] >= BACKGROUND_NICE and got == nice
