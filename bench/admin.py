"""``scripts/bench admin [--users N] [--runs N]``: how long the admin commands take on a
state of N users (10,000 by default), as an operator runs them: each a fresh
``mfa-proxy`` process, wall time, the median of ``--runs``.

The baseline measured in the same run is ``mfa-proxy --version`` (the interpreter
and the CLI starting, nothing read): each command is reported as its time and as
its time over the baseline's, so the machine's speed mostly cancels out. The
state is SQLite in a temporary folder (its ./conf/mfa-proxy.toml, found as an operator's would be)
with the local users file (empty: the
users are imported with ``--allow-unknown``), every user enrolled and a tenth of
them also locked. A figure, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[totp]
issuer = "Bench"

[directory]
type = "local"
users_file = "users.toml"
"""


def mfa_proxy() -> str:
    return str(Path(sys.executable).with_name("mfa-proxy"))


def run(folder: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run([mfa_proxy(), *args], cwd=folder, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"mfa-proxy {' '.join(args)} exited {done.returncode}: "
                           f"{done.stderr.strip()}")
    return took, done


def prepare(folder: Path, users: int) -> None:
    (folder / "conf").mkdir()
    (folder / "conf" / "mfa-proxy.toml").write_text(CONFIG)
    (folder / "conf" / "users.toml").write_text("")
    rows = []
    for n in range(users):
        name = f"user{n:05d}"
        key = base64.b32encode(hashlib.sha256(name.encode()).digest()[:20]).decode()  # 160 bits
        rows.append(f"{name},{key},7")
    (folder / "users.csv").write_text("\n".join(rows) + "\n")
    took, _ = run(folder, "user", "import", "users.csv", "--allow-unknown")
    print(f"imported {users:,} users in {took:.1f} s")
    # A tenth locked, so that --locked has something to find.
    from policy.store import Store

    store = Store(f"sqlite:///{folder / 'conf' / 'var' / 'state.db'}")
    now = time.time()
    try:
        for n in range(0, users, 10):
            store.hot.record_failure(f"user{n:05d}", now, 1, 900)
    finally:
        store.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    commands = {
        "--version": ["--version"],
        "user show": ["user", "show", "user00042", "--json"],
        "user list": ["user", "list", "--json"],
        "user list --locked": ["user", "list", "--locked", "--json"],
        "check-config": ["check-config"],
    }
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mfa-bench-admin-") as tmp:
        folder = Path(tmp)
        prepare(folder, args.users)
        listed = json.loads(run(folder, "user", "list", "--json")[1].stdout)
        if len(listed) != args.users:
            raise RuntimeError(f"user list gave {len(listed)} users, not {args.users}")
        for name, argv_ in commands.items():
            times = [run(folder, *argv_)[0] for _ in range(args.runs)]
            figures[name] = {"median_s": statistics.median(times), "min_s": min(times)}
    base = figures["--version"]["median_s"]
    print(f"\n{args.users:,} users, median of {args.runs} runs (wall, a new process each)")
    print(f"{'command':<22}{'median':>10}{'min':>10}{'÷ --version':>14}")
    for name, f in figures.items():
        print(f"{name:<22}{f['median_s'] * 1000:>8.0f}ms{f['min_s'] * 1000:>8.0f}ms"
              f"{f['median_s'] / base:>13.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"users": args.users, "runs": args.runs,
                                               "figures": figures}, indent=2))
    return 0
