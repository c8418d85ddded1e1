"""What the RADIUS duplicate cache costs per cached answer: measured, never asserted.

Run ``.venv/bin/python -m bench.radius_cache_memory [ENTRIES]`` (default 100,000, the
server's bound). It fills a :class:`DuplicateCache` to ENTRIES answers of 38 bytes (an
Access-Accept with its Message-Authenticator, what a sign-in gets), then runs two
more windows' worth of requests through the bound, as a proxy under steady load
does, and prints the bytes per entry two ways: traced by ``tracemalloc`` (what the
objects ask for) and the growth of the process's RSS (what the allocator keeps,
size classes and dict tables included). Each way runs in a fresh interpreter.
A measurement, not a test.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc

from proxy.radius.duplicates import DuplicateCache, duplicate_key

ANSWER = 38


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(entries: int, traced: bool) -> float:
    now = [1000.0]
    cache = DuplicateCache(window=30, max_entries=entries, clock=lambda: now[0])
    answers = [os.urandom(ANSWER) for _ in range(256)]
    authenticators = [os.urandom(16) for _ in range(3 * entries)]
    gc.collect()
    if traced:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if traced else _rss()
    for i, authenticator in enumerate(authenticators):
        key = duplicate_key("vpn", i % 256, authenticator)
        cache.begin(key)
        now[0] += 30 / entries / 2  # twice the rate a full window holds: the bound binds
        cache.complete(key, bytes(answers[i % 256]))  # a fresh object, as every reply is
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if traced else _rss()
    return (after - before) / len(cache)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("traced", "rss"):
        print(f"{measure(int(argv[1]), argv[0] == 'traced'):.0f}")
        return 0
    entries = int(argv[0]) if argv else 100_000
    figures = {way: subprocess.run([sys.executable, "-m", "bench.radius_cache_memory", way,
                                    str(entries)], capture_output=True, text=True,
                                   check=True).stdout.strip() for way in ("traced", "rss")}
    print(f"duplicate cache, {entries:,} answers of {ANSWER} bytes: {figures['traced']} bytes "
          f"per entry traced (tracemalloc), {figures['rss']} bytes per entry of RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
