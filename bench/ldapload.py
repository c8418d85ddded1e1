"""The ceiling: what slapd itself does for a Python client that costs almost nothing.

A raw asyncio LDAP client with a few lines of BER (X.690 definite lengths):
persistent connections, one operation in flight per connection (RFC 4511
§4.2.1: nothing else may be in flight during a bind). Two workloads:

``bind``        simple binds as random users on one connection per worker;
``searchbind``  the proxy's real work: search ``(uid=X)`` as the service
                account on one connection, then bind as the DN found on a
                second one. One operation = search + bind.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    PEOPLE_DN,
    SVC_DN,
    SVC_PASSWORD,
    CpuWindow,
    latency_ms,
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


def bind_request(msgid: int, dn: str, secret: str) -> bytes:
    return message(msgid, tlv(0x60, integer(3) + tlv(0x04, dn.encode())
                              + tlv(0x80, secret.encode())))


def unbind_request(msgid: int) -> bytes:
    return message(msgid, b"\x42\x00")


def search_request(msgid: int, base: str, attribute: str, value: str) -> bytes:
    body = (tlv(0x04, base.encode()) + integer(2, 0x0A) + integer(0, 0x0A)  # subtree, never
            + integer(1) + integer(10)  # size limit 1 (2 would do), time limit 10 s
            + tlv(0x01, b"\x00")  # typesOnly FALSE
            + tlv(0xA3, tlv(0x04, attribute.encode()) + tlv(0x04, value.encode()))
            + tlv(0x30, tlv(0x04, b"1.1")))  # no attributes: the DN is all we need
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
    dn: bytes | None = None


class Connection(asyncio.Protocol):
    """One LDAP connection, one request at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.found: bytes | None = None
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
        elif op in (0x61, 0x65):  # BindResponse, SearchResultDone: resultCode first
            _, s, e = read_header(msg, start)  # type: ignore[misc]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(Reply(int.from_bytes(msg[s:e], "big"), self.found))

    def _send(self, data: bytes) -> asyncio.Future[Reply]:
        if self.closed is not None:
            raise self.closed
        self.waiter = asyncio.get_running_loop().create_future()
        self.found = None
        self.transport.write(data)
        return self.waiter

    def next_id(self) -> int:
        self.msgid = self.msgid % 0x7FFFFFFF + 1
        return self.msgid

    def bind(self, dn: str, secret: str) -> asyncio.Future[Reply]:
        return self._send(bind_request(self.next_id(), dn, secret))

    def search_uid(self, value: str) -> asyncio.Future[Reply]:
        return self._send(search_request(self.next_id(), PEOPLE_DN, "uid", value))

    def close(self) -> None:
        if self.transport is not None and self.closed is None:
            self.transport.write(unbind_request(self.next_id()))
            self.transport.close()


async def connect(host: str, port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(Connection, host, port)
    return conn


def try_simple_bind(host: str, port: int, dn: str, secret: str, timeout: float = 2.0) -> int:
    """A blocking simple bind: the result code (0 = success); raises when unreachable."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(bind_request(1, dn, secret))
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
