"""An asyncio RADIUS load generator: Access-Requests with PAP and a fresh TOTP code.

Each request carries Message-Authenticator (first, as BlastRADIUS advice has
it; HMAC-MD5, RFC 3579 §3.2), User-Name, User-Password hidden per RFC 2865
§5.2 (``passNNNNN`` + separator + the user's current code, made with pyotp),
NAS-IP-Address and NAS-Port. Each reply is checked before it counts: its
Response Authenticator (RFC 2865 §3) and its Message-Authenticator; a reply
that fails either is dropped and counted as ``bad_reply``.

Load model: closed loop, ``concurrency`` requests outstanding, warm-up then a
fixed measured window; bounded by time, by ``max_requests`` and by the user
pool. No retransmissions: a request unanswered after ``timeout`` counts as a
timeout. At most 32 requests outstanding per UDP socket, Identifiers recycled
first in, first out, so an Identifier comes back as late as possible.

Every request does the full work: :class:`UserPool` never hands out a user
twice within one TOTP time step, so no (user, time step) pair -- no code --
is ever sent twice, and nothing a server could cache (a replayed code, a
retransmission) is asked for. Fresh users first; a user drawn in step T goes
back to the pool only once step T is over and its requests are answered or
timed out (``reuse``, 5 s into step T+1), and a run stops when the pool is empty.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import pyotp

from bench.common import CpuWindow, latency_ms, memory_kb, password, totp_secret, uid

ACCESS_REQUEST, ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE = 1, 2, 3, 11
USER_NAME, USER_PASSWORD, NAS_IP_ADDRESS, NAS_PORT, MESSAGE_AUTHENTICATOR = 1, 2, 4, 5, 80
PER_SOCKET = 32
LOOPBACK = bytes((127, 0, 0, 1))

# ---------------------------------------------------------------- RFC 2865 / 3579


def hide_password(plain: bytes, nas_secret: bytes, authenticator: bytes) -> bytes:
    """RFC 2865 §5.2: c(i) = p(i) xor MD5(S + c(i-1)), c(0) = Request Authenticator."""
    if not 0 < len(plain) <= 128:
        raise ValueError("User-Password must be 1..128 octets")
    padded = plain + b"\x00" * (-len(plain) % 16)
    out = bytearray()
    chain = authenticator
    for k in range(0, len(padded), 16):
        key = hashlib.md5(nas_secret + chain).digest()  # noqa: S324 - RFC 2865 says MD5
        chain = bytes(a ^ b for a, b in zip(padded[k:k + 16], key, strict=True))
        out += chain
    return bytes(out)


def attribute(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value) + 2)) + value


def access_request(ident: int, authenticator: bytes, nas_secret: bytes, username: bytes,
                   user_password: bytes, nas_port: int) -> bytes:
    body = (attribute(USER_NAME, username)
            + attribute(USER_PASSWORD, hide_password(user_password, nas_secret, authenticator))
            + attribute(NAS_IP_ADDRESS, LOOPBACK)
            + attribute(NAS_PORT, struct.pack(">I", nas_port & 0xFFFFFFFF)))
    length = 20 + 18 + len(body)
    head = struct.pack(">BBH", ACCESS_REQUEST, ident, length) + authenticator
    zeroed = head + attribute(MESSAGE_AUTHENTICATOR, bytes(16)) + body
    mac = hmac.new(nas_secret, zeroed, hashlib.md5).digest()
    return head + attribute(MESSAGE_AUTHENTICATOR, mac) + body


def check_reply(data: bytes, authenticator: bytes, nas_secret: bytes) -> str | None:
    """None when the reply is authentic, else what is wrong with it. A reply without
    Message-Authenticator is authentic here; :func:`has_message_authenticator` tells."""
    if len(data) < 20:
        return "short"
    length = int.from_bytes(data[2:4], "big")
    if not 20 <= length <= len(data):
        return "bad length"
    data = data[:length]
    want = hashlib.md5(data[:4] + authenticator + data[20:] + nas_secret).digest()  # noqa: S324
    if not hmac.compare_digest(want, data[4:20]):
        return "bad Response Authenticator"
    pos = 20
    while pos < length:
        if pos + 2 > length or data[pos + 1] < 2 or pos + data[pos + 1] > length:
            return "bad attribute length"
        kind, size = data[pos], data[pos + 1]
        if kind == MESSAGE_AUTHENTICATOR:
            if size != 18:
                return "bad Message-Authenticator length"
            zeroed = (data[:4] + authenticator + data[20:pos + 2] + bytes(16)
                      + data[pos + 18:])
            if not hmac.compare_digest(hmac.new(nas_secret, zeroed, hashlib.md5).digest(),
                                       data[pos + 2:pos + 18]):
                return "bad Message-Authenticator"
        pos += size
    return None


def has_message_authenticator(data: bytes) -> bool:
    pos, length = 20, min(len(data), int.from_bytes(data[2:4], "big"))
    while pos + 2 <= length and data[pos + 1] >= 2:
        if data[pos] == MESSAGE_AUTHENTICATOR:
            return True
        pos += data[pos + 1]
    return False


def first_attribute(data: bytes) -> int | None:
    return data[20] if len(data) > 21 else None


# ---------------------------------------------------------------- users


class UserPool:
    """Users 1..n in random order, each at most once per TOTP time step."""

    def __init__(self, users: int, period: int = 30, reuse: bool = True,
                 seed: int = 1, settle: float = 5.0) -> None:
        order = list(range(1, users + 1))
        random.Random(seed).shuffle(order)
        self.fresh: collections.deque[int] = collections.deque(order)
        self.period, self.reuse = period, reuse
        self.step: int | None = None
        self.this_step: list[int] = []  # drawn in self.step: not before the next step
        self.cooling: list[int] = []  # drawn in an earlier step, not yet back
        self.settle = settle
        self.seen = bytearray(users + 1)
        self.drawn = self.reused = 0
        self.exhausted = False

    def refresh(self, now: float) -> int:
        """Bring back the users whose step is over; returns the step of ``now``."""
        step = int(now // self.period)
        if step != self.step:
            self.cooling += self.this_step
            self.step, self.this_step = step, []
        if self.cooling and now - step * self.period >= self.settle:
            # their step is over and so is any request of theirs still in flight: the
            # same users may come again, with the codes of this step
            if self.reuse:
                self.fresh.extend(self.cooling)
            self.cooling = []
        return step

    def next_refill(self, now: float) -> float:
        """When every user drawn so far is back (reuse only): the next step + settle."""
        return (int(now // self.period) + 1) * self.period + self.settle + 0.05

    def draw(self, now: float) -> tuple[int, int] | None:
        """(user, time step) for a request made at ``now``; None when none is left."""
        step = self.refresh(now)
        if not self.fresh:
            self.exhausted = True
            return None
        i = self.fresh.popleft()
        self.this_step.append(i)
        self.drawn += 1
        if self.seen[i]:
            self.reused += 1
        self.seen[i] = 1
        return i, step

    @property
    def left(self) -> int:
        return len(self.fresh)


class Codes:
    """Current codes of the bench users (pyotp), computed once per (user, step)."""

    def __init__(self, digits: int = 6, period: int = 30) -> None:
        self.digits, self.period = digits, period

    def code(self, i: int, step: int) -> str:
        return pyotp.TOTP(totp_secret(uid(i)), digits=self.digits,
                          interval=self.period).at(step * self.period)


# ---------------------------------------------------------------- the client


@dataclass
class Counts:
    sent: int = 0
    accept: int = 0
    reject: int = 0
    challenge: int = 0
    other_code: int = 0
    timeouts: int = 0
    bad_reply: int = 0
    stray: int = 0
    socket_errors: int = 0
    replies_without_message_authenticator: int = 0
    replies_message_authenticator_not_first: int = 0
    reject_step_phase: list[float] = field(default_factory=list)  # seconds into the step


class RadiusSocket(asyncio.DatagramProtocol):
    def __init__(self, nas_secret: bytes, counts: Counts) -> None:
        self.nas_secret, self.counts = nas_secret, counts
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes | None]]] = {}
        ids = list(range(256))
        random.shuffle(ids)
        self.free: collections.deque[int] = collections.deque(ids)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 20:
            self.counts.bad_reply += 1
            return
        entry = self.pending.get(data[1])
        if entry is None:
            self.counts.stray += 1
            return
        authenticator, fut = entry
        if check_reply(data, authenticator, self.nas_secret) is not None:
            self.counts.bad_reply += 1
            return
        del self.pending[data[1]]
        if not fut.done():
            fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        self.counts.socket_errors += 1


@dataclass
class LevelResult:
    label: str
    concurrency: int
    seconds: float
    warmup: float
    completed: int = 0
    counts: Counts = field(default_factory=Counts)  # the measured window only
    outside_counts: Counts = field(default_factory=Counts)  # warm-up and the tail
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    pool_exhausted: bool = False
    stopped_early_at: float | None = None
    users_drawn: int = 0

    def summary(self) -> dict[str, Any]:
        c = self.counts
        measured = self.seconds if self.stopped_early_at is None else self.stopped_early_at
        cpu_s = self.cpu.get("cpu_s", {})
        n = self.completed
        return {
            "label": self.label, "concurrency": self.concurrency,
            "seconds": measured, "warmup_s": self.warmup,
            "completed": n, "req_per_s": n / measured if measured else 0.0,
            **latency_ms(self.latencies),
            "accept": c.accept, "reject": c.reject, "challenge": c.challenge,
            "other_code": c.other_code, "timeouts": c.timeouts, "bad_reply": c.bad_reply,
            "stray": c.stray, "socket_errors": c.socket_errors,
            "replies_without_message_authenticator": c.replies_without_message_authenticator,
            "replies_message_authenticator_not_first":
                c.replies_message_authenticator_not_first,
            "reject_step_phase_s": c.reject_step_phase[:20],
            "rejects_outside_window": self.outside_counts.reject,
            "timeouts_outside_window": self.outside_counts.timeouts,
            "cpu_s": cpu_s,
            "cpu_us_per_req": {k: (v / n * 1e6 if n else None) for k, v in cpu_s.items()},
            "cpu_cores": {k: v / measured for k, v in cpu_s.items()} if measured else {},
            "machine_busy_cores": self.cpu.get("machine_busy_s", 0.0) / measured
            if measured else None,
            "other_cores": self.cpu.get("other_s", 0.0) / measured if measured else None,
            "memory_kb": self.memory,
            "pool_exhausted": self.pool_exhausted, "users_drawn": self.users_drawn,
        }


@dataclass
class Target:
    label: str
    host: str
    port: int
    nas_secret: bytes
    separator: str = ","
    watch: dict[str, int] = field(default_factory=dict)  # name -> pid (CPU, memory)
    memory_of: tuple[str, ...] = ()  # names in watch whose RSS is reported


async def _worker(target: Target, sock: RadiusSocket, pool: UserPool, codes: Codes,
                  result: LevelResult, window: dict[str, float], timeout: float,
                  max_requests: int) -> None:
    loop = asyncio.get_running_loop()
    nas_secret = target.nas_secret
    mono, wall = time.monotonic, time.time
    counted, warm = result.counts, result.outside_counts
    sep = target.separator
    while True:
        now = mono()
        if now >= window["end"] or counted.sent + warm.sent >= max_requests:
            return
        t_wall = wall()
        drawn = pool.draw(t_wall)
        if drawn is None:
            if window["stopped"] is None:
                window["stopped"] = now
            return
        i, step = drawn
        user_password = f"{password(i)}{sep}{codes.code(i, step)}".encode()
        while not sock.free:  # cannot happen below 256 outstanding per socket
            await asyncio.sleep(0.001)
        ident = sock.free.popleft()
        authenticator = os.urandom(16)
        packet = access_request(ident, authenticator, nas_secret, uid(i).encode(), user_password, i)
        fut: asyncio.Future[bytes | None] = loop.create_future()
        sock.pending[ident] = (authenticator, fut)
        timer = loop.call_later(timeout, _expire, sock, ident, fut)
        t0 = mono()
        sock.transport.sendto(packet)
        reply = await fut
        t1 = mono()
        timer.cancel()
        sock.free.append(ident)
        in_window = t0 >= window["start"] and t1 <= window["end"]
        c = counted if in_window else warm
        c.sent += 1
        if reply is None:
            c.timeouts += 1
            continue
        if in_window:
            result.latencies.append(t1 - t0)
        if not has_message_authenticator(reply):
            c.replies_without_message_authenticator += 1
        elif first_attribute(reply) != MESSAGE_AUTHENTICATOR:
            c.replies_message_authenticator_not_first += 1
        code = reply[0]
        if code == ACCESS_ACCEPT:
            c.accept += 1
        elif code == ACCESS_REJECT:
            c.reject += 1
            if len(c.reject_step_phase) < 50:
                c.reject_step_phase.append(round(t_wall % pool.period, 3))
        elif code == ACCESS_CHALLENGE:
            c.challenge += 1
        else:
            c.other_code += 1


def _expire(sock: RadiusSocket, ident: int, fut: asyncio.Future[bytes | None]) -> None:
    if not fut.done():
        sock.pending.pop(ident, None)
        fut.set_result(None)


async def _level(target: Target, pool: UserPool, codes: Codes, concurrency: int,
                 seconds: float, warmup: float, timeout: float,
                 max_requests: int) -> LevelResult:
    loop = asyncio.get_running_loop()
    result = LevelResult(target.label, concurrency, seconds, warmup)
    nsock = (concurrency + PER_SOCKET - 1) // PER_SOCKET
    socks: list[RadiusSocket] = []
    try:
        for _ in range(nsock):
            _, proto = await loop.create_datagram_endpoint(
                lambda: RadiusSocket(target.nas_secret, result.counts),
                remote_addr=(target.host, target.port), family=socket.AF_INET)
            socks.append(proto)
        now = time.monotonic()
        window: dict[str, Any] = {"start": now + warmup, "end": now + warmup + seconds,
                                  "stopped": None}
        drawn0 = pool.drawn
        pool.exhausted = False
        tasks = [asyncio.create_task(_worker(target, socks[k % nsock], pool, codes, result,
                                             window, timeout, max_requests))
                 for k in range(concurrency)]
        await asyncio.sleep(max(0.0, window["start"] - time.monotonic()))
        cpu = CpuWindow(target.watch)
        await asyncio.wait(tasks, timeout=max(0.0, window["end"] - time.monotonic()))
        result.cpu = cpu.stop()
        result.memory = {n: memory_kb(target.watch[n]) for n in target.memory_of}
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout + 30)
        result.completed = len(result.latencies)
        result.users_drawn = pool.drawn - drawn0
        result.pool_exhausted = pool.exhausted
        if window["stopped"] is not None and window["stopped"] < window["end"]:
            # the pool ran dry: measure over the part of the window that had load
            result.stopped_early_at = max(0.0, window["stopped"] - window["start"])
            # requests after the pool ran dry did not happen: the CPU window is longer,
            # so per-request CPU is an upper bound in that case
        return result
    finally:
        for s in socks:
            if s.transport is not None:
                s.transport.close()


def run_level(target: Target, pool: UserPool, codes: Codes, concurrency: int, seconds: float,
              warmup: float, timeout: float = 2.0, max_requests: int = 2_000_000) -> LevelResult:
    if target.host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("loopback only")
    return asyncio.run(_level(target, pool, codes, concurrency, seconds, warmup, timeout,
                              max_requests))


def probe(target: Target, pool: UserPool, codes: Codes, timeout: float = 5.0) -> int | None:
    """One Access-Request (blocking): the reply's code, or None when none came."""
    drawn = pool.draw(time.time())
    if drawn is None:
        raise RuntimeError("user pool empty before the first request")
    i, step = drawn
    authenticator = os.urandom(16)
    packet = access_request(7, authenticator, target.nas_secret, uid(i).encode(),
                            f"{password(i)}{target.separator}{codes.code(i, step)}".encode(), i)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (target.host, target.port))
        try:
            data = s.recv(4096)
        except TimeoutError:
            return None
    problem = check_reply(data, authenticator, target.nas_secret)
    if problem is not None:
        raise RuntimeError(f"{target.label}: reply to the probe: {problem}")
    return data[0]
