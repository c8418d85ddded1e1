"""Blocking work (the state store) off the reactor thread, handed over in batches.

Twisted's ``deferToThreadPool`` costs two thread wake-ups per call, and under
load each one makes the reactor and the worker fight over the GIL: measured
at c=32, the two state calls of one RADIUS request cost ~470 µs of CPU that
way, more than the whole rest of the request. Here the reactor puts jobs on
a queue; a worker that wakes takes every job waiting, runs them one after
the other and hands all the results back in one ``callFromThread``. Under
load a wake-up serves many requests; when idle a job waits for nobody.

Jobs run one at a time per worker thread, in the order they were put. A job
fails only its own Deferred, except inside a group: ``submit_grouped`` jobs
that wait together run in one ``group()`` (the store's one-transaction,
one-commit block) and get their results only once it committed. When the
group fails (an error from the store inside it, or the commit) its writes are
gone, so every job in it fails: the callers reject, fail-secure.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

log = logging.getLogger("mfa_proxy.worker")

# One batch is bounded so results flow back while a long queue drains.
MAX_BATCH = 256
_STOP = object()

Job = tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any], bool]  # bool: grouped
Done = list[tuple[Deferred[Any], bool, Any]]


class WorkersStopped(RuntimeError):
    """A job submitted after :meth:`BatchWorkers.stop`."""


class BatchWorkers:
    """``submit(f, *args) -> Deferred`` run by ``threads`` worker threads."""

    def __init__(self, reactor: Any, threads: int = 1, name: str = "state",
                 group: Callable[[], AbstractContextManager[None]] | None = None,
                 group_errors: tuple[type[BaseException], ...] = ()) -> None:
        """``group``: the block grouped jobs run in (None: they run alone);
        ``group_errors``: what a job may raise that spoils its whole group."""
        self.reactor = reactor
        self._group, self._group_errors = group, group_errors
        self._jobs: queue.SimpleQueue[Job | object] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, threads))]
        self._stopped = False
        self.batches = 0  # wake-ups that ran at least one job (for tests and benchmarks)
        self.jobs = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._put(f, args, False)

    def submit_grouped(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Like :meth:`submit`, for a job that may share a group with its neighbours."""
        return self._put(f, args, self._group is not None)

    def _put(self, f: Callable[..., Any], args: tuple[Any, ...], grouped: bool) -> Deferred[Any]:
        if self._stopped:  # nobody would run it: fail now rather than never
            return fail(WorkersStopped("the state worker threads have stopped"))
        d: Deferred[Any] = Deferred()
        self._jobs.put((f, args, d, grouped))
        return d

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what was queued, then end the threads (waits up to ``timeout``)."""
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # -- worker thread

    def _work(self) -> None:
        get, get_nowait = self._jobs.get, self._jobs.get_nowait
        while True:
            batch = [get()]
            try:
                while len(batch) < MAX_BATCH:
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            stops = 0
            done: Done = []
            jobs: list[Job] = []
            for job in batch:
                if job is _STOP:
                    stops += 1
                else:
                    jobs.append(job)  # type: ignore[arg-type]
            start = 0
            while start < len(jobs):
                end = start + 1
                while jobs[start][3] and end < len(jobs) and jobs[end][3]:
                    end += 1
                if jobs[start][3]:
                    self._run_group(jobs[start:end], done)
                else:
                    _run(jobs[start], done)
                start = end
            if done:
                self.batches += 1
                self.jobs += len(done)
                self.reactor.callFromThread(_deliver, done)
            if stops:
                for _ in range(stops - 1):  # another thread's: give it back
                    self._jobs.put(_STOP)
                return

    def _run_group(self, jobs: list[Job], done: Done) -> None:
        assert self._group is not None
        results: Done = []
        try:
            with self._group():
                for job in jobs:
                    f, args, d, _ = job
                    try:
                        results.append((d, True, f(*args)))
                    except self._group_errors:
                        raise
                    except Exception:  # this job's own error: the group goes on
                        results.append((d, False, Failure()))  # type: ignore[no-untyped-call]
        except BaseException:
            failure = Failure()  # type: ignore[no-untyped-call]
            log.error("a group of %d state job(s) failed and was rolled back: %s",
                      len(jobs), failure.getErrorMessage())
            done.extend((job[2], False, failure) for job in jobs)
            return
        done.extend(results)


def _run(job: Job, done: Done) -> None:
    f, args, d, _ = job
    try:
        done.append((d, True, f(*args)))
    except BaseException:
        done.append((d, False, Failure()))  # type: ignore[no-untyped-call]


def _deliver(done: list[tuple[Deferred[Any], bool, Any]]) -> None:
    for d, ok, value in done:
        try:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        except Exception:  # a callback's bug must not cost the other results of the batch
            log.exception("a state job's callback failed")
