"""Where a Python server's CPU goes: py-spy attached from outside, summed by function.

``py-spy record --format raw`` writes collapsed stacks (``a;b;c N``); the
summary counts, per function, the samples where it is on top of the stack
(self) and those where it is anywhere on it (inclusive).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

from bench.common import Managed


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, gil: bool = True, rate: int = 200) -> Managed:
    """py-spy on pid (and its subprocesses) without pausing it. ``gil``: sample only the
    thread holding the GIL -- where a GIL-bound server's Python time goes -- rather
    than every thread that is not idle (which counts threads waiting on a lock)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy not found (scripts/bench radius --profile installs it "
                           "into .venv)")
    return Managed.start("py-spy", [exe, "record", "--pid", str(pid), "--duration",
                                    str(int(seconds)), "--rate", str(rate), "--nonblocking",
                                    "--subprocesses", *(["--gil"] if gil else []),
                                    "--format", "raw", "-o", str(out)],
                         out.with_suffix(".log"))


def _frame_name(frame: str) -> str:
    """'verify (backends/ldap.py:351)' -> 'verify (backends/ldap.py)': one row per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.split("/work/main/", 1)[-1]
    return f"{name} ({path})" if path else name


PROJECT = ("policy/", "proxy/", "backends/")
# frames every sample of a thread or of the reactor goes through: they tell nothing
PLUMBING = ("(threading.py)", "(twisted/_threads/", "(twisted/python/threadpool.py)",
            "(twisted/python/context.py)", "(twisted/python/log.py)",
            "(twisted/internet/base.py)", "(twisted/internet/epollreactor.py)",
            "(twisted/internet/posixbase.py)", "(click/", "<module> (", "main (proxy/cli.py)",
            "serve (proxy/cli.py)", "run (proxy/service.py)")


def _project(frame: str) -> bool:
    return frame.rpartition(" (")[2].startswith(PROJECT)


def summarize(raw: Path, top: int = 20) -> dict[str, object]:
    """Per function: self (on top of the stack), inclusive (anywhere on it, plumbing
    left out), and 'project': each sample counted to the innermost frame of our own
    code (policy/, proxy/, backends/), so library time lands on the code that called it."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    project: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            if not any(p in f for p in PLUMBING):
                inclusive[f] += count
        ours = [f for f in frames if _project(f)]
        project[ours[-1] if ours else "(no project frame: reactor, libraries)"] += count
    pct = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "self": [(f, pct(c)) for f, c in self_counts.most_common(top)],
        "inclusive": [(f, pct(c)) for f, c in inclusive.most_common(top)],
        "project": [(f, pct(c)) for f, c in project.most_common(top)],
    }


def render(summary: dict[str, object]) -> str:
    what = ("the thread holding the GIL (Python work; C code that releases the GIL, and "
            "the reactor waiting, are left out)" if summary.get("gil") else
            "every thread not idle, summed (threads blocked on a lock count too)")
    lines = [f"py-spy samples: {summary['samples']} of {what}; % of all samples"]
    for key, title in (("project", "by project function (library time counted to the "
                                   "innermost policy/, proxy/, backends/ frame)"),
                       ("self", "top functions by self time"),
                       ("inclusive", "top functions by inclusive time (thread and reactor "
                                     "plumbing left out)")):
        lines.append(f"  {title}:")
        for name, p in summary[key]:  # type: ignore[attr-defined]
            lines.append(f"    {p:5.1f}%  {name}")
    return "\n".join(lines)
