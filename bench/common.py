"""Shared by the benchmarks: the bench data set, processes we own, /proc sampling, stats.

Every process a benchmark starts goes through :class:`Managed`, a context
manager that stops it by PID (SIGTERM, then SIGKILL) however the block ends,
together with any process it forked that is still alive.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# ---------------------------------------------------------------- the bench data set
BASE_DN = "dc=example,dc=org"
PEOPLE_DN = f"ou=people,{BASE_DN}"
SVC_DN = f"cn=svc,ou=services,{BASE_DN}"
SVC_PASSWORD = "svc-secret"  # noqa: S105 - the bench directory's, public


def uid(i: int) -> str:
    return f"user{i:05d}"


def user_dn(i: int) -> str:
    return f"uid={uid(i)},{PEOPLE_DN}"


def password(i: int) -> str:
    return f"pass{i:05d}"


def totp_secret(username: str) -> str:
    """The bench user's TOTP key: base32(sha1("totp:" + uid)), no padding (20 bytes)."""
    digest = hashlib.sha1(b"totp:" + username.encode()).digest()  # noqa: S324 - test data
    return base64.b32encode(digest).decode()


# ---------------------------------------------------------------- ports and logs


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nobody uses right now, free for both TCP and UDP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port")


def free_udp_pair() -> int:
    """A UDP port p with p+1 free too (RADIUS auth + accounting)."""
    for _ in range(100):
        p = free_port(socket.SOCK_DGRAM)
        if p >= 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        return p
    raise RuntimeError("no free pair of loopback UDP ports")


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()  # fields from #3 (state) on


def children_of(pid: int) -> list[int]:
    """Direct children of pid (all threads' children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """pid and every descendant alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += children_of(p)
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process tree (all threads of pid and of its live
    descendants, plus the reaped children counted in pid's cutime+cstime)."""
    total = 0.0
    for k, p in enumerate(tree(pid)):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime
        if k == 0:
            total += int(f[13]) + int(f[14])  # cutime, cstime: children waited for
    return total / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM summed over the process tree (kB), and the process count."""
    out = {"VmRSS": 0, "VmHWM": 0, "processes": 0}
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "VmHWM"):
                        out[k] += int(v.split()[0])
        except OSError:
            continue
        out["processes"] += 1
    return out


def system_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs; busy leaves out idle, iowait and steal."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    steal = vals[7] if len(vals) > 7 else 0
    total = sum(vals[:8])
    return total - vals[3] - vals[4] - steal, total


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CpuWindow:
    """CPU of named process trees, this process and the whole machine over one window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.c0 = {n: cpu_seconds(p) for n, p in pids.items()}
        self.s0 = self_cpu()
        self.m0 = system_cpu()

    def stop(self) -> dict[str, Any]:
        t1 = time.monotonic()
        c1 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        s1 = self_cpu()
        m1 = system_cpu()
        used = {n: c1[n] - self.c0[n] for n in self.pids}
        used["loadgen"] = s1 - self.s0
        busy = (m1[0] - self.m0[0]) / CLK_TCK
        return {"seconds": t1 - self.t0, "cpu_s": used, "machine_busy_s": busy,
                "other_s": busy - sum(used.values())}


# ---------------------------------------------------------------- stats


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_ms(latencies_s: list[float]) -> dict[str, float]:
    lat = sorted(latencies_s)
    if not lat:
        return {"p50_ms": math.nan, "p90_ms": math.nan, "p99_ms": math.nan,
                "max_ms": math.nan, "mean_ms": math.nan}
    return {"p50_ms": percentile(lat, 50) * 1e3, "p90_ms": percentile(lat, 90) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "max_ms": lat[-1] * 1e3,
            "mean_ms": sum(lat) / len(lat) * 1e3}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right if right is not None else set(range(1, len(headers)))

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ---------------------------------------------------------------- processes we own


@dataclass
class Managed:
    """A subprocess we started and must stop, by PID, whatever happens.

    ``with Managed.start(name, argv, log) as proc:`` -- on leaving the block the
    process and every descendant it still has get SIGTERM, then SIGKILL.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout: float = 10.0
    _known: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log_path: Path,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Managed:
        log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        finally:
            log.close()
        return cls(name, popen, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_children(self) -> None:
        """Note the descendants alive now, so they are stopped too."""
        if self.alive():
            self._known.update(tree(self.pid)[1:])

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited with "
                               f"{self.popen.returncode}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        self.remember_children()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=self.stop_timeout)
        for p in sorted(self._known):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)  # only PIDs we saw under our own child

    def __enter__(self) -> Managed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(check: Any, timeout: float, what: str, proc: Managed | None = None,
               interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check()
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last = e
        time.sleep(interval)
    raise RuntimeError(f"{what}: not ready within {timeout:g} s"
                       + (f" ({type(last).__name__}: {last})" if last else "")
                       + (f"\n{tail(proc.log_path)}" if proc else ""))


@contextlib.contextmanager
def stopping(procs: list[Managed]) -> Iterator[None]:
    """Stop every process in ``procs`` (appended to while the block runs) on exit."""
    try:
        yield
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception as e:  # noqa: BLE001 - stop the others all the same
                say(f"stopping {p.name} (pid {p.pid}) failed: {e}")
