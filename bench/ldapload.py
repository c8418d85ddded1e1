"""The ceiling: what slapd itself does for a Python client that costs almost nothing.

A raw asyncio LDAP client with a few lines of BER (X.690 definite lengths):
persistent connections, one operation in flight per connection (RFC 4511
§4.2.1: nothing else may be in flight during a bind). Two workloads:

``bind``        simple binds as random users on one connection per worker;
``searchbind``  the proxy's real work: search ``(uid=X)`` as the service
                account on one connection, then bind as the DN found on a
                second one. One operation = search + bind.

And what an application behind an LDAP server does (``scripts/bench ldap``,
:func:`run_frontend`), the same against slapd directly or through mfa-proxy:

``bindsearch``  on one persistent connection per worker: a simple bind as
                the user, then a base search ``(uid=X)`` of the user's own
                entry (cn, mail): the bench slapd's ACL lets a user read that
                entry only, not even ou=people. One operation = bind + search,
                both checked (bind 0; search 0 with exactly that entry).
``search``      one bind as the service account when the worker connects,
                then searches ``(uid=X)`` of random users only: the forwarding
                path alone.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    PEOPLE_DN,
    SVC_DN,
    SVC_PASSWORD,
    CpuWindow,
    latency_ms,
    memory_kb,
    password,
    uid,
    user_dn,
)

# ---------------------------------------------------------------- BER


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _length(len(value)) + value


def integer(v: int, tag: int = 0x02) -> bytes:
    return tlv(tag, v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big", signed=True))


def message(msgid: int, op: bytes) -> bytes:
    return tlv(0x30, integer(msgid) + op)


def bind_request(msgid: int, dn: str, bind_password: str) -> bytes:
    return message(msgid, tlv(0x60, integer(3) + tlv(0x04, dn.encode())
                              + tlv(0x80, bind_password.encode())))


def unbind_request(msgid: int) -> bytes:
    return message(msgid, b"\x42\x00")


def search_request(msgid: int, base: str, attribute: str, value: str) -> bytes:
    body = (tlv(0x04, base.encode()) + integer(2, 0x0A) + integer(0, 0x0A)  # subtree, never
            + integer(1) + integer(10)  # size limit 1 (2 would do), time limit 10 s
            + tlv(0x01, b"\x00")  # typesOnly FALSE
            + tlv(0xA3, tlv(0x04, attribute.encode()) + tlv(0x04, value.encode()))
            + tlv(0x30, tlv(0x04, b"1.1")))  # no attributes: the DN is all we need
    return message(msgid, tlv(0x63, body))


SCOPE_BASE, SCOPE_SUBTREE = 0, 2


def search_attributes(msgid: int, base: str, scope: int, attribute: str, value: str,
                      attributes: tuple[str, ...], size_limit: int = 0) -> bytes:
    """A search with an equality filter that asks for ``attributes``."""
    body = (tlv(0x04, base.encode()) + integer(scope, 0x0A) + integer(0, 0x0A)
            + integer(size_limit) + integer(10) + tlv(0x01, b"\x00")
            + tlv(0xA3, tlv(0x04, attribute.encode()) + tlv(0x04, value.encode()))
            + tlv(0x30, b"".join(tlv(0x04, a.encode()) for a in attributes)))
    return message(msgid, tlv(0x63, body))


def read_header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(tag, value start, value end) of the TLV at pos; None when incomplete."""
    if pos + 2 > len(buf):
        return None
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first & 0x80:
        n = first & 0x7F
        if pos + n > len(buf):
            return None
        first = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    return tag, pos, pos + first


SIZE_LIMIT_EXCEEDED = 4


@dataclass
class Reply:
    code: int
    dn: bytes | None = None  # the last entry's DN (searches)
    entries: int = 0  # SearchResultEntry messages (searches)


class Connection(asyncio.Protocol):
    """One LDAP connection, one request at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.found: bytes | None = None
        self.entries = 0
        self.transport: Any = None
        self.msgid = 0
        self.closed: BaseException | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = exc or ConnectionError("LDAP connection closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.closed)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head = read_header(self.buf, 0)
            if head is None or head[2] > len(self.buf):
                return
            msg = bytes(self.buf[head[1]:head[2]])
            del self.buf[:head[2]]
            self._message(msg)

    def _message(self, msg: bytes) -> None:
        _, _, id_end = read_header(msg, 0)  # type: ignore[misc]
        op, start, _ = read_header(msg, id_end)  # type: ignore[misc]
        if op == 0x64:  # SearchResultEntry: objectName first
            _, s, e = read_header(msg, start)  # type: ignore[misc]
            self.found = msg[s:e]
            self.entries += 1
        elif op in (0x61, 0x65):  # BindResponse, SearchResultDone: resultCode first
            _, s, e = read_header(msg, start)  # type: ignore[misc]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(Reply(int.from_bytes(msg[s:e], "big"), self.found,
                                             self.entries))

    def _send(self, data: bytes) -> asyncio.Future[Reply]:
        if self.closed is not None:
            raise self.closed
        self.waiter = asyncio.get_running_loop().create_future()
        self.found = None
        self.entries = 0
        self.transport.write(data)
        return self.waiter

    def next_id(self) -> int:
        self.msgid = self.msgid % 0x7FFFFFFF + 1
        return self.msgid

    def bind(self, dn: str, bind_password: str) -> asyncio.Future[Reply]:
        return self._send(bind_request(self.next_id(), dn, bind_password))

    def search_uid(self, value: str) -> asyncio.Future[Reply]:
        return self._send(search_request(self.next_id(), PEOPLE_DN, "uid", value))

    def search(self, base: str, scope: int, attribute: str, value: str,
               attributes: tuple[str, ...]) -> asyncio.Future[Reply]:
        return self._send(search_attributes(self.next_id(), base, scope, attribute, value,
                                            attributes))

    def close(self) -> None:
        if self.transport is not None and self.closed is None:
            self.transport.write(unbind_request(self.next_id()))
            self.transport.close()


async def connect(host: str, port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(Connection, host, port)
    return conn


def try_simple_bind(host: str, port: int, dn: str, bind_password: str, timeout: float = 2.0) -> int:
    """A blocking simple bind: the result code (0 = success); raises when unreachable."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(bind_request(1, dn, bind_password))
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the bind response")
            buf += chunk
            head = read_header(buf, 0)
            if head is not None and head[2] <= len(buf):
                break
        _, id_start, _ = head
        _, _, id_end = read_header(buf, id_start)  # type: ignore[misc]
        _, op_start, _ = read_header(buf, id_end)  # type: ignore[misc]
        _, s0, e0 = read_header(buf, op_start)  # type: ignore[misc]
        code = int.from_bytes(buf[s0:e0], "big")
        s.sendall(unbind_request(2))
        return code


# ---------------------------------------------------------------- load


@dataclass
class LdapResult:
    mode: str
    concurrency: int
    seconds: float
    ops: int = 0
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        busy = self.cpu.get("cpu_s", {})
        per_op = {k: (v / self.ops * 1e6 if self.ops else None) for k, v in busy.items()}
        return {"mode": self.mode, "concurrency": self.concurrency, "seconds": self.seconds,
                "ops": self.ops, "ok": self.ok, "failed": self.failed,
                "ops_per_s": self.ops / self.seconds if self.seconds else 0.0,
                **latency_ms(self.latencies), "cpu_us_per_op": per_op,
                "machine_busy_cores": self.cpu.get("machine_busy_s", 0.0) / self.seconds,
                "other_cores": self.cpu.get("other_s", 0.0) / self.seconds}


async def _worker(mode: str, host: str, port: int, users: int, rng: random.Random,
                  window: dict[str, float], result: LdapResult, max_ops: int) -> None:
    binder = await connect(host, port)
    searcher = None
    try:
        if mode == "searchbind":
            searcher = await connect(host, port)
            reply = await searcher.bind(SVC_DN, SVC_PASSWORD)
            if reply.code != 0:
                raise RuntimeError(f"service account bind failed: result {reply.code}")
        mono = time.monotonic
        while True:
            t0 = mono()
            if t0 >= window["end"] or result.ops >= max_ops:
                break
            i = rng.randint(1, users)
            if searcher is not None:
                found = await searcher.search_uid(uid(i))
                if found.code not in (0, SIZE_LIMIT_EXCEEDED) or found.dn is None:
                    code = found.code or 32
                else:
                    code = (await binder.bind(found.dn.decode(), password(i))).code
            else:
                code = (await binder.bind(user_dn(i), password(i))).code
            t1 = mono()
            if t0 >= window["start"] and t1 <= window["end"]:
                result.ops += 1
                result.latencies.append(t1 - t0)
                if code == 0:
                    result.ok += 1
                else:
                    result.failed += 1
    finally:
        binder.close()
        if searcher is not None:
            searcher.close()


async def _run(mode: str, host: str, port: int, users: int, concurrency: int, seconds: float,
               warmup: float, watch: dict[str, int], max_ops: int) -> LdapResult:
    result = LdapResult(mode, concurrency, seconds)
    now = time.monotonic()
    window = {"start": now + 3600, "end": now + 3600 + seconds}  # set once connected
    tasks = [asyncio.create_task(_worker(mode, host, port, users, random.Random(k * 7919 + 1),
                                         window, result, max_ops)) for k in range(concurrency)]
    await asyncio.sleep(0.2)  # connections and service binds out of the way
    window["start"] = time.monotonic() + warmup
    window["end"] = window["start"] + seconds
    await asyncio.sleep(max(0.0, window["start"] - time.monotonic()))
    cpu = CpuWindow(watch)
    await asyncio.sleep(max(0.0, window["end"] - time.monotonic()))
    result.cpu = cpu.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    return result


def run(mode: str, host: str, port: int, users: int, concurrency: int, seconds: float,
        warmup: float, watch: dict[str, int], max_ops: int = 5_000_000) -> LdapResult:
    """Closed loop: ``concurrency`` workers for warm-up + ``seconds``, at most ``max_ops``."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("loopback only")
    return asyncio.run(_run(mode, host, port, users, concurrency, seconds, warmup, watch,
                            max_ops))


# ---------------------------------------------------------------- an LDAP server's clients

ENTRY_ATTRIBUTES = ("cn", "mail")
MAX_RECONNECTS = 5  # per worker and level: then the worker gives up (counted)
# (user index, bind password) for a bind made at wall-clock time t; None: no user left
Credential = Callable[[float], "tuple[int, str] | None"]


@dataclass
class FrontendResult:
    """One workload at one concurrency against one server (slapd, or the proxy)."""

    label: str
    workload: str
    concurrency: int
    seconds: float
    warmup: float
    ops: int = 0  # completed and checked inside the measured window
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    outside: int = 0  # operations in the warm-up and the tail, not measured
    outside_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    bind_latencies: list[float] = field(default_factory=list)
    search_latencies: list[float] = field(default_factory=list)
    reconnects: int = 0
    gave_up: int = 0  # workers that stopped after MAX_RECONNECTS lost connections
    stuck: int = 0  # workers still waiting for an answer long after the window
    cpu: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    stopped_early_at: float | None = None  # seconds into the window when users ran out

    def summary(self) -> dict[str, Any]:
        measured = self.seconds if self.stopped_early_at is None else self.stopped_early_at
        cpu_s = self.cpu.get("cpu_s", {})
        n = self.ops
        binds = latency_ms(self.bind_latencies)
        searches = latency_ms(self.search_latencies)
        return {
            "label": self.label, "workload": self.workload, "concurrency": self.concurrency,
            "seconds": measured, "warmup_s": self.warmup, "ops": n, "ok": self.ok,
            "failed": n - self.ok, "failures": dict(self.failures),
            "ops_per_s": n / measured if measured else 0.0,
            **latency_ms(self.latencies),
            "bind_p50_ms": binds["p50_ms"], "bind_p99_ms": binds["p99_ms"],
            "search_p50_ms": searches["p50_ms"], "search_p99_ms": searches["p99_ms"],
            "outside_window_ops": self.outside,
            "outside_window_failures": dict(self.outside_failures),
            "reconnects": self.reconnects, "workers_gave_up": self.gave_up,
            "workers_stuck": self.stuck,
            "cpu_s": cpu_s,
            "cpu_us_per_op": {k: (v / n * 1e6 if n else None) for k, v in cpu_s.items()},
            "cpu_cores": {k: v / measured for k, v in cpu_s.items()} if measured else {},
            "machine_busy_cores": self.cpu.get("machine_busy_s", 0.0) / measured
            if measured else None,
            "other_cores": self.cpu.get("other_s", 0.0) / measured if measured else None,
            "memory_kb": self.memory, "stopped_early": self.stopped_early_at is not None,
        }


def check_entry(reply: Reply, dn: str) -> str | None:
    """None when a search found exactly the entry ``dn``, else what went wrong."""
    if reply.code != 0:
        return f"search result {reply.code}"
    if reply.entries != 1:
        return f"search returned {reply.entries} entries"
    if reply.dn is None or reply.dn.decode(errors="replace").lower() != dn.lower():
        return "search returned another entry"
    return None


async def _open(workload: str, host: str, port: int) -> Connection:
    conn = await connect(host, port)
    if workload == "search":
        reply = await conn.bind(SVC_DN, SVC_PASSWORD)
        if reply.code != 0:
            conn.close()
            raise RuntimeError(f"service account bind answered {reply.code} on {host}:{port}")
    return conn


async def _frontend_worker(workload: str, host: str, port: int, conn: Connection,
                           credential: Credential, pick: Callable[[], int],
                           window: dict[str, Any], result: FrontendResult,
                           max_ops: int) -> None:
    mono, wall = time.monotonic, time.time
    lost = 0
    try:
        while True:
            t0 = mono()
            if t0 >= window["end"] or result.ops + result.outside >= max_ops:
                return
            if conn.closed is not None:
                lost += 1
                if lost > MAX_RECONNECTS:
                    result.gave_up += 1
                    return
                result.reconnects += 1
                conn = await _open(workload, host, port)
                continue
            bind_s = None
            try:
                if workload == "bindsearch":
                    drawn = credential(wall())
                    if drawn is None:  # the caller's users ran out
                        if window["stopped"] is None:
                            window["stopped"] = t0
                        return
                    i, bind_password = drawn
                    dn = user_dn(i)
                    bound = await conn.bind(dn, bind_password)
                    t1 = mono()
                    bind_s = t1 - t0
                    if bound.code != 0:
                        failure: str | None = f"bind result {bound.code}"
                        t2 = t1
                    else:
                        found = await conn.search(dn, SCOPE_BASE, "uid", uid(i),
                                                  ENTRY_ATTRIBUTES)
                        t2 = mono()
                        failure = check_entry(found, dn)
                else:
                    i = pick()
                    dn = user_dn(i)
                    t1 = t0
                    found = await conn.search(PEOPLE_DN, SCOPE_SUBTREE, "uid", uid(i),
                                              ENTRY_ATTRIBUTES)
                    t2 = mono()
                    failure = check_entry(found, dn)
            except OSError:  # ConnectionError and friends: the server closed on us
                t1 = t2 = mono()
                failure = "connection lost"
            if t0 >= window["start"] and t2 <= window["end"]:
                result.ops += 1
                result.latencies.append(t2 - t0)
                if bind_s is not None:
                    result.bind_latencies.append(bind_s)
                if failure is None:
                    result.ok += 1
                    if workload == "bindsearch":
                        result.search_latencies.append(t2 - t1)
                    else:
                        result.search_latencies.append(t2 - t0)
                else:
                    result.failures[failure] += 1
            else:
                result.outside += 1
                if failure is not None:
                    result.outside_failures[failure] += 1
    finally:
        conn.close()


async def _frontend(label: str, workload: str, host: str, port: int, users: int,
                    credential: Credential, concurrency: int, seconds: float, warmup: float,
                    watch: dict[str, int], memory_of: tuple[str, ...], max_ops: int,
                    seed: int, grace: float) -> FrontendResult:
    result = FrontendResult(label, workload, concurrency, seconds, warmup)
    conns = await asyncio.wait_for(
        asyncio.gather(*(_open(workload, host, port) for _ in range(concurrency)),
                       return_exceptions=True), timeout=60)
    broken = [c for c in conns if isinstance(c, BaseException)]
    good = [c for c in conns if isinstance(c, Connection)]
    if broken:
        for c in good:
            c.close()
        raise RuntimeError(f"{label}: {len(broken)} of {concurrency} connections failed: "
                           f"{broken[0]!r}")
    rng = random.Random(seed)
    pick = lambda: rng.randint(1, users)  # noqa: E731
    now = time.monotonic()
    window: dict[str, Any] = {"start": now + warmup, "end": now + warmup + seconds,
                              "stopped": None}
    tasks = [asyncio.create_task(_frontend_worker(workload, host, port, conn, credential, pick,
                                                  window, result, max_ops))
             for conn in good]
    try:
        await asyncio.sleep(max(0.0, window["start"] - time.monotonic()))
        cpu = CpuWindow(watch)
        await asyncio.wait(tasks, timeout=max(0.0, window["end"] - time.monotonic()))
        result.cpu = cpu.stop()
        result.memory = {n: memory_kb(watch[n]) for n in memory_of}
        _, pending = await asyncio.wait(tasks, timeout=grace)
        result.stuck = len(pending)
    finally:
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [e for e in done if isinstance(e, BaseException)
              and not isinstance(e, asyncio.CancelledError)]
    if errors:
        raise RuntimeError(f"{label}: a worker failed: {errors[0]!r}") from errors[0]
    if window["stopped"] is not None and window["stopped"] < window["end"]:
        # the users ran out: measure over the part of the window that had load (the CPU
        # window is longer, so CPU per operation is an upper bound then)
        result.stopped_early_at = max(0.0, window["stopped"] - window["start"])
    return result


def run_frontend(label: str, workload: str, host: str, port: int, users: int,
                 credential: Credential, concurrency: int, seconds: float, warmup: float,
                 watch: dict[str, int], memory_of: tuple[str, ...] = (),
                 max_ops: int = 5_000_000, seed: int = 1, grace: float = 10.0) -> FrontendResult:
    """Closed loop: ``concurrency`` persistent connections for warm-up + ``seconds``, at most
    ``max_ops`` operations. ``bindsearch`` binds as the users ``credential`` hands out (a
    fresh one per operation); ``search`` binds as the service account once per connection
    and searches random users. Workers still waiting ``grace`` seconds after the window
    are cancelled and counted as stuck."""
    if workload not in ("bindsearch", "search"):
        raise ValueError(f"unknown workload {workload!r}")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("loopback only")
    return asyncio.run(_frontend(label, workload, host, port, users, credential, concurrency,
                                 seconds, warmup, watch, memory_of, max_ops, seed, grace))
