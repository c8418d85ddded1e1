"""``scripts/bench radius``: mfa-proxy's RADIUS throughput against its ceiling and FreeRADIUS.

One run, one machine, one slapd:

(a) the ceiling -- slapd's own simple-bind and search+bind throughput from a
    raw asyncio client (:mod:`bench.ldapload`), at ``--ldap-concurrency``;
(b) mfa-proxy -- ``mfa-proxy serve`` with a generated config (LDAP
    directory, SQLite state, append mode), every bench user enrolled with
    ``mfa-proxy user import``, driven by :mod:`bench.radiusload` at each
    concurrency for ``--seconds`` after ``--warmup``;
(c) the reference -- FreeRADIUS 3.2 (rlm_ldap search+bind + rlm_totp) on the
    same slapd, driven by the same load generator the same way
    (``--no-freeradius`` to skip).

``--group-rows`` adds rows of (b) with ``[directory] group_base`` configured:
"unused" (the default) one where no rule uses groups (its req/s must equal
the row without group_base: no group search is made), "all" that one and one
with a ``[[radius.reply]]`` rule (a group search on every accept), "none" no
extra row. Each is its own ``mfa-proxy serve``, all started before the first
level; each level runs on every server in turn, the order reversed from one
level to the next; reported as ratios to (b) at each concurrency.

Every request does the full work: no (user, time step) pair is sent twice,
and the proxy's config has no cache in the path. It prints a table and the
issue-3 target, writes JSON to ``var/bench/radius-<timestamp>.json`` and
exits 0 whatever the figures; non-zero only when the benchmark itself broke.
It is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import freeradius, ldapload, profile, proxy, radiusload, slapd
from bench.common import Managed, fmt, ratio, say, stopping, table

ROOT = Path(__file__).resolve().parent.parent
TARGET_CONCURRENCY = 32
TARGET_RSS_MB = 100.0
TARGET_TEXT = ("TARGET (issue 3): at c=32 proxy >= 1.0x FreeRADIUS throughput, p99 no worse, "
               "RSS < 100 MB")


def bench_arguments(name: str, concurrency: str, profile_run: str) -> argparse.ArgumentParser:
    """The options every benchmark has (``concurrency``: what one level keeps busy)."""
    ap = argparse.ArgumentParser(
        prog=f"scripts/bench {name}", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, help="bench users in slapd, all enrolled "
                    "(default 100000; --quick 10000)")
    ap.add_argument("--concurrency", help=f"{concurrency}, comma-separated "
                    "(default 1,8,32,128; --quick 8,32)")
    ap.add_argument("--seconds", type=float, help="measured seconds per level "
                    "(default 10; --quick 5)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before each "
                    "measurement (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="a fast sanity run: 10,000 users, concurrency 8,32, 5 s each")
    ap.add_argument("--no-reuse", action="store_true",
                    help="never send a user's code twice in the whole run, even in a later "
                         "time step (a level stops when the users run out)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                    help="mfa-proxy's [logging] level (default info, as in production; "
                         "accepts are not logged by default: [logging] decisions)")
    ap.add_argument("--slapd-threads", type=int, default=16)
    ap.add_argument("--profile", action="store_true",
                    help="after the measured levels, profile the proxy with py-spy during an "
                         f"extra c=32 {profile_run} run (not in the table)")
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument("--profile-threads", action="store_true",
                    help="sample every busy thread instead of only the one holding the GIL")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before starting, wait up to this long for the machine to be idle "
                         "(other processes' CPU disturbs the figures)")
    ap.add_argument("--json", help="where to write the results "
                    f"(default var/bench/{name}-<timestamp>.json)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (configs, logs, slapd data)")
    return ap


def bench_defaults(ap: argparse.ArgumentParser, a: argparse.Namespace,
                   max_level: int) -> argparse.Namespace:
    """Fill the --quick defaults, parse the levels and check the common ranges."""
    a.users = a.users or (10_000 if a.quick else 100_000)
    a.concurrency = a.concurrency or ("8,32" if a.quick else "1,8,32,128")
    a.seconds = a.seconds or (5.0 if a.quick else 10.0)
    try:
        a.levels = [int(c) for c in str(a.concurrency).split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: expected numbers like 1,8,32, got {a.concurrency!r}")
    if not a.levels or any(c < 1 or c > max_level for c in a.levels):
        ap.error(f"--concurrency: each level between 1 and {max_level}")
    if not 1 <= a.users <= 1_000_000:
        ap.error("--users: between 1 and 1,000,000")
    if not 0 < a.seconds <= 600 or not 0 <= a.warmup <= 60:
        ap.error("--seconds must be in (0, 600], --warmup in [0, 60]")
    if not 0 < a.profile_seconds <= 600:
        ap.error("--profile-seconds must be in (0, 600]")
    return a


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = bench_arguments("radius", "RADIUS requests outstanding", "Access-Request")
    ap.description = __doc__
    ap.add_argument("--no-freeradius", action="store_true", help="skip the FreeRADIUS reference")
    ap.add_argument("--ldap-concurrency", type=int, default=32,
                    help="connections (pairs for search+bind) of the ceiling run (default 32)")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="seconds before a RADIUS request counts as a timeout (no retransmit)")
    ap.add_argument("--max-requests", type=int, default=2_000_000,
                    help="hard cap on requests per level")
    ap.add_argument("--freeradius-threads", type=int, default=32,
                    help="FreeRADIUS thread pool and LDAP connection pool size")
    ap.add_argument("--group-rows", choices=("none", "unused", "all"), default="unused",
                    help="extra mfa-proxy rows with [directory] group_base set: 'unused' "
                         "(no rule uses groups; default), 'all' (and one with a reply rule "
                         "by group), 'none'")
    ap.add_argument("--baseline-tree", metavar="DIR",
                    help="another mfa-proxy source tree (e.g. `git archive` of an older "
                         "commit): one more row, its `mfa-proxy serve` run with PYTHONPATH=DIR, "
                         "levels interleaved with (b) and reported as a ratio to it")
    ap.add_argument("--proxy-cpus", default="", metavar="N[,N...]",
                    help="[service] cpu_affinity of the mfa-proxy rows (not of the baseline "
                         "row): serve's threads on these CPUs only")
    ap.add_argument("--baseline-cpus", default="", metavar="N[,N...]",
                    help="[service] cpu_affinity of the --baseline-tree row (its tree must "
                         "know the key)")
    a = bench_defaults(ap, ap.parse_args(argv), max_level=1024)
    if a.baseline_tree and not (Path(a.baseline_tree) / "proxy" / "cli.py").is_file():
        ap.error(f"--baseline-tree: no mfa-proxy source tree at {a.baseline_tree}")
    return a


# ---------------------------------------------------------------- one server, every level


def drive(target: radiusload.Target, pool: radiusload.UserPool, codes: radiusload.Codes,
          a: argparse.Namespace, server: Managed, scrape: Any = None) -> list[dict[str, Any]]:
    """Every concurrency level against one server. A level that runs out of users is
    measured over the part that had them; before a level that would run out, wait for
    the next time step, which brings every user back (unless --no-reuse)."""
    results: list[dict[str, Any]] = []
    for c in a.levels:
        summary = one_level(target, pool, codes, a, server, c, results, scrape)
        if summary is None:
            break
        results.append(summary)
    return results


def one_level(target: radiusload.Target, pool: radiusload.UserPool, codes: radiusload.Codes,
              a: argparse.Namespace, server: Managed, c: int, before_this: list[dict[str, Any]],
              scrape: Any = None) -> dict[str, Any] | None:
    """One level at concurrency ``c`` after the levels ``before_this`` (same server);
    None when the users ran out (--no-reuse)."""
    if before_this:
        time.sleep(1.0)
        need = before_this[-1]["req_per_s"] * (a.warmup + a.seconds) * 1.2
        pool.refresh(time.time())
        if pool.left < need and pool.reuse:
            wait = pool.next_refill(time.time()) - time.time()
            say(f"{target.label}: {pool.left:,} users left, ~{need:,.0f} needed: waiting "
                f"{wait:.0f} s for the next time step to bring them back")
            time.sleep(max(0.0, wait))
            pool.refresh(time.time())
        if not pool.left:
            say(f"{target.label}: no users left (--no-reuse); levels from c={c} skipped")
            return None
    before = scrape() if scrape else None
    level = radiusload.run_level(target, pool, codes, c, a.seconds, a.warmup, a.timeout,
                                 a.max_requests)
    server.check()  # a server that died is a broken benchmark, not a slow server
    summary = level.summary()
    if scrape is not None and before is not None:
        summary["metrics_delta"] = proxy.metrics_delta(before, scrape())
    short = level.stopped_early_at is not None
    say(f"{target.label} c={c}: {summary['req_per_s']:,.0f} req/s, "
        f"p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, "
        f"accept {summary['accept']}, reject {summary['reject']}, "
        f"timeouts {summary['timeouts']}"
        + (f"; the user pool ran out: measured over {summary['seconds']:.1f} s"
           if short else ""))
    return summary


def quiet_machine(wait: float) -> float:
    """CPU cores busy on this machine before we start (others' work disturbs the
    figures); with ``wait``, wait up to that long for under 0.3 busy cores."""
    from bench.common import CLK_TCK, system_cpu

    deadline = time.monotonic() + wait
    while True:
        b0 = system_cpu()[0]
        time.sleep(2.0)
        busy = (system_cpu()[0] - b0) / CLK_TCK / 2.0
        if busy < 0.3 or time.monotonic() >= deadline:
            return busy
        say(f"machine busy ({busy:.2f} cores used by others): waiting for quiet")
        time.sleep(5.0)


def ceiling(directory: slapd.Directory, a: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for mode in ("bind", "searchbind"):
        r = ldapload.run(mode, directory.host, directory.port, directory.users,
                         a.ldap_concurrency, a.seconds, a.warmup, {"slapd": directory.pid})
        out[mode] = r.summary()
        say(f"slapd {mode} c={a.ldap_concurrency}: {out[mode]['ops_per_s']:,.0f} ops/s, "
            f"p99 {out[mode]['p99_ms']:.2f} ms ({r.failed} failed)")
        if r.failed:
            raise RuntimeError(f"slapd {mode}: {r.failed} operations failed: bench data broken?")
        time.sleep(1.0)
    return out


GROUP_ROWS = {"none": (), "unused": ("unused",), "all": ("unused", "rule")}
GROUP_LABELS = {"unused": "mfa-proxy +group_base", "rule": "mfa-proxy +reply rule",
                "baseline": "mfa-proxy baseline"}  # baseline: --baseline-tree, no group_base


@dataclass
class ProxyRun:
    """One ``mfa-proxy serve`` of the bench, started and probed, and its levels so far."""

    groups: str
    config: proxy.ProxyConfig
    server: Managed
    target: radiusload.Target
    pool: radiusload.UserPool
    codes: radiusload.Codes
    scrape: Callable[[], Any]
    import_seconds: float
    memory_start: dict[str, int]
    levels: list[dict[str, Any]] = field(default_factory=list)


def run_proxy(directory: slapd.Directory, workdir: Path, a: argparse.Namespace,
              procs: list[Managed]) -> dict[str, Any]:
    run = start_proxy(directory, workdir, a, procs)
    run.levels = drive(run.target, run.pool, run.codes, a, run.server, run.scrape)
    return proxy_results(run, workdir, a)


def run_with_group_rows(directory: slapd.Directory, workdir: Path, a: argparse.Namespace,
                        procs: list[Managed]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(b) and the group rows, every server started first, then each level run on
    each server in turn -- the order reversed at every level, so a load that drifts
    over the run (other work on the machine) weighs on every row alike."""
    baseline = ("baseline",) if a.baseline_tree else ()
    runs = [start_proxy(directory, workdir, a, procs, g)
            for g in ("", *baseline, *GROUP_ROWS[a.group_rows])]
    for i, c in enumerate(a.levels):
        for run in (runs if i % 2 == 0 else runs[::-1]):
            summary = one_level(run.target, run.pool, run.codes, a, run.server, c, run.levels,
                                run.scrape)
            if summary is not None:
                run.levels.append(summary)
    results = [proxy_results(run, workdir, a) for run in runs]
    for run in runs:
        run.server.stop()
    return results[0], {run.groups: r for run, r in zip(runs[1:], results[1:], strict=True)}


def start_proxy(directory: slapd.Directory, workdir: Path, a: argparse.Namespace,
                procs: list[Managed], groups: str = "") -> ProxyRun:
    pdir = workdir / (f"proxy-groups-{groups}" if groups else "proxy")
    pdir.mkdir()
    env = None
    if groups == "baseline":
        env = {**os.environ, "PYTHONPATH": str(Path(a.baseline_tree).resolve())}
    config = proxy.write_config(pdir, directory.url, a.log_level,
                                groups="" if groups == "baseline" else groups,
                                cpus=a.baseline_cpus if groups == "baseline" else a.proxy_cpus)
    import_s = proxy.enroll_users(config, directory.users, pdir, env)
    server = proxy.start(config, pdir, env)
    procs.append(server)
    server.remember_children()
    say(f"proxy: serving, pid {server.pid}, RADIUS 127.0.0.1:{config.radius_port}")
    target = radiusload.Target(GROUP_LABELS.get(groups, "mfa-proxy"), "127.0.0.1",
                               config.radius_port, config.nas_secret.encode(), ",",
                               {"mfa-proxy": server.pid, "slapd": directory.pid},
                               ("mfa-proxy",))
    # another draw of users for each row (slapd's caches favour none of them)
    pool = radiusload.UserPool(directory.users, reuse=not a.no_reuse,
                               seed=11 + 2 * list(GROUP_LABELS).index(groups) + 2 if groups
                               else 11)
    codes = radiusload.Codes()
    memory_start = proxy_memory(server.pid)
    first = radiusload.probe(target, pool, codes)
    if first != radiusload.ACCESS_ACCEPT:
        raise RuntimeError(f"proxy: the first request got code {first}, not an Access-Accept:\n"
                           f"{proxy.log_tail(pdir)}")
    return ProxyRun(groups, config, server, target, pool, codes,
                    lambda: proxy.metrics(config.http_port), import_s, memory_start)


def proxy_results(run: ProxyRun, workdir: Path, a: argparse.Namespace) -> dict[str, Any]:
    config = run.config
    out: dict[str, Any] = {
        "levels": run.levels, "import_seconds": run.import_seconds,
        "memory_kb_at_start": run.memory_start, "memory_kb_at_end": proxy_memory(run.server.pid),
        "users_drawn": run.pool.drawn, "users_reused": run.pool.reused,
        "config": config.path.read_text().replace(config.nas_secret, "<secret>"),
    }
    if a.profile and not run.groups:
        out["profile"] = profile_proxy(run.target, run.pool, run.codes, run.server.pid,
                                       workdir, a)
    return out


def proxy_memory(pid: int) -> dict[str, int]:
    from bench.common import memory_kb

    return memory_kb(pid)


def profile_proxy(target: radiusload.Target, pool: radiusload.UserPool,
                  codes: radiusload.Codes, pid: int, workdir: Path,
                  a: argparse.Namespace) -> dict[str, Any]:
    out_dir = ROOT / "var" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    say(f"profile: py-spy on pid {pid} for {a.profile_seconds:g} s at c={TARGET_CONCURRENCY}")
    spy = profile.record(pid, a.profile_seconds, raw, gil=not a.profile_threads)
    with spy:
        time.sleep(1.0)  # py-spy attached
        level = radiusload.run_level(target, pool, codes, TARGET_CONCURRENCY,
                                     a.profile_seconds, 0.5, a.timeout, a.max_requests)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.popen.wait(timeout=a.profile_seconds + 30)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing:\n{(raw.with_suffix('.log')).read_text()}")
    summary = profile.summarize(raw)
    summary["gil"] = not a.profile_threads
    summary["raw_file"] = str(raw.relative_to(ROOT))
    summary["req_per_s_while_profiled"] = level.summary()["req_per_s"]
    return summary


def run_freeradius(directory: slapd.Directory, workdir: Path, a: argparse.Namespace,
                   procs: list[Managed]) -> dict[str, Any]:
    why = freeradius.missing()
    if why:
        return {"skipped": why}
    fdir = workdir / "freeradius"
    fdir.mkdir()
    import secrets

    secret = secrets.token_urlsafe(24)
    ref = freeradius.start(fdir, directory.port, secret, a.freeradius_threads)
    procs.append(ref.proc)
    say(f"freeradius {freeradius.version()}: pid {ref.pid}, RADIUS 127.0.0.1:{ref.port}")
    target = radiusload.Target("freeradius", "127.0.0.1", ref.port, secret.encode(), ",",
                               {"freeradius": ref.pid, "slapd": directory.pid}, ("freeradius",))
    pool = radiusload.UserPool(directory.users, reuse=not a.no_reuse, seed=23)
    codes = radiusload.Codes()
    # rlm_totp takes the current step only: a probe sent in the last moment of a step
    # could be refused, so wait out the end of one
    if time.time() % 30 > 28.5:
        time.sleep(30 - time.time() % 30 + 0.1)
    first = radiusload.probe(target, pool, codes)
    if first != radiusload.ACCESS_ACCEPT:
        raise RuntimeError(f"freeradius: the first request got code {first}, not an "
                           f"Access-Accept:\n{(fdir / 'log' / 'radius.log').read_text()[-3000:]}")
    levels = drive(target, pool, codes, a, ref.proc)
    return {"version": freeradius.version(), "levels": levels, "users_drawn": pool.drawn,
            "users_reused": pool.reused,
            "what": "rlm_ldap search+bind as the user, rlm_totp (current step only, no replay "
                    "protection, no lockout) on totpSecret; reject_delay 0, max_requests 1M, "
                    f"{a.freeradius_threads} threads and LDAP connections"}


# ---------------------------------------------------------------- the report


def by_concurrency(levels: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {lv["concurrency"]: lv for lv in levels}


def report(res: dict[str, Any], a: argparse.Namespace) -> str:
    out: list[str] = []
    env = res["environment"]
    out.append(f"mfa-proxy RADIUS benchmark  {res['started']}  {env['cpus']} CPUs  "
               f"{a.users:,} users  {a.seconds:g} s per level after {a.warmup:g} s warm-up")
    out.append("")
    ceil = res["ceiling"]
    out.append(f"(a) ceiling: slapd from a raw asyncio client, {a.ldap_concurrency} "
               "persistent connections (pairs)")
    rows = []
    for mode, label in (("bind", "simple bind"), ("searchbind", "search + bind")):
        r = ceil[mode]
        rows.append([label, r["ops_per_s"], r["p50_ms"], r["p99_ms"],
                     r["cpu_us_per_op"].get("slapd"), r["cpu_us_per_op"].get("loadgen"),
                     r["other_cores"]])
    out.append(table(["operation", "ops/s", "p50 ms", "p99 ms", "slapd µs/op",
                      "client µs/op", "other cores"], [_f(r) for r in rows]))
    out.append("")
    px = by_concurrency(res["proxy"]["levels"])
    fr_res = res.get("freeradius", {})
    fr = by_concurrency(fr_res.get("levels", []))
    sb = ceil["searchbind"]["ops_per_s"]
    out.append("(b) mfa-proxy and (c) FreeRADIUS: Access-Request, PAP, password,code "
               "(append mode), a fresh (user, time step) every request")
    headers = ["server", "c", "req/s", "p50 ms", "p99 ms", "accept", "reject", "t/o",
               "server µs/req", "slapd µs/req", "loadgen µs/req", "other cores",
               "÷ ceiling", "proxy ÷ FR"]
    rows = []
    short = False
    group_runs = [(GROUP_LABELS[g], by_concurrency(res["proxy_groups"][g]["levels"]))
                  for g in res.get("proxy_groups", {})]
    for name, levels in (("mfa-proxy", px), *group_runs, ("freeradius", fr)):
        key = "freeradius" if name == "freeradius" else "mfa-proxy"
        for c, lv in sorted(levels.items()):
            cpu = lv["cpu_us_per_req"]
            vs_fr = ratio(lv["req_per_s"], fr[c]["req_per_s"]) if (
                key == "mfa-proxy" and c in fr) else None
            rate = _f([lv["req_per_s"]])[0] + ("*" if lv["seconds"] < a.seconds else "")
            short = short or lv["seconds"] < a.seconds
            rows.append([name, c, rate, lv["p50_ms"], lv["p99_ms"], lv["accept"],
                         lv["reject"], lv["timeouts"], cpu.get(key), cpu.get("slapd"),
                         cpu.get("loadgen"), lv["other_cores"], ratio(lv["req_per_s"], sb),
                         vs_fr])
    out.append(table(headers, [_f(r) for r in rows], right=set(range(1, len(headers)))))
    out.append("  ÷ ceiling: requests/s ÷ slapd search+bind ops/s (a); "
               "server µs/req: CPU (user+system, all threads and child processes) of the "
               "server process per completed request; other cores: CPU used on the machine "
               "by processes not in the bench (a disturbed level shows well above 0)")
    if short:
        out.append("  * the user pool ran out during this level: measured over the seconds "
                   "that had users (JSON: seconds); more --users for full levels")
    for name, levels in group_runs:
        out.append(f"  {name} ÷ mfa-proxy (no group_base), same run:")
        for c, lv in sorted(levels.items()):
            if c not in px:
                continue
            cpu, base = lv["cpu_us_per_req"], px[c]["cpu_us_per_req"]
            out.append(
                f"    c={c}: req/s {fmt(ratio(lv['req_per_s'], px[c]['req_per_s']), 2)}x, "
                f"proxy µs/req {fmt(ratio(cpu.get('mfa-proxy'), base.get('mfa-proxy')), 2)}x, "
                f"slapd µs/req {fmt(ratio(cpu.get('slapd'), base.get('slapd')), 2)}x "
                f"(other cores {fmt(lv['other_cores'], 2)} vs {fmt(px[c]['other_cores'], 2)})")
    if any(g != "baseline" for g in res.get("proxy_groups", {})):
        out.append(f"  +group_base: [directory] group_base set ({slapd.GROUPS} groups, "
                   "member indexed eq, users without memberOf), no rule uses groups: no "
                   "group search; +reply rule: a [[radius.reply]] rule by group, a group "
                   "search on every accept (group_cache_seconds = 0)")
    if fr_res.get("skipped"):
        out.append(f"  FreeRADIUS: skipped ({fr_res['skipped']})")
    elif fr_res:
        out.append(f"  FreeRADIUS {fr_res['version']}: {fr_res['what']}")
    out.append("")
    mem_end = res["proxy"]["memory_kb_at_end"]
    peak = max([mem_end["VmHWM"]] + [lv["memory_kb"]["mfa-proxy"]["VmHWM"]
                                     for lv in res["proxy"]["levels"]])
    rss = [lv["memory_kb"]["mfa-proxy"]["VmRSS"] for lv in res["proxy"]["levels"]]
    out.append(f"mfa-proxy memory: VmHWM (peak) {peak / 1024:.1f} MB, VmRSS after each level "
               + ", ".join(f"{r / 1024:.1f}" for r in rss) + " MB"
               + f" ({mem_end['processes']} process(es)); at start "
               f"{res['proxy']['memory_kb_at_start']['VmRSS'] / 1024:.1f} MB")
    for g, row in res.get("proxy_groups", {}).items():
        hwm = max([row["memory_kb_at_end"]["VmHWM"]]
                  + [lv["memory_kb"]["mfa-proxy"]["VmHWM"] for lv in row["levels"]])
        out.append(f"{GROUP_LABELS[g]} memory: VmHWM (peak) {hwm / 1024:.1f} MB; at start "
                   f"{row['memory_kb_at_start']['VmRSS'] / 1024:.1f} MB")
    for name in ("freeradius",):
        if fr:
            hwm = max(lv["memory_kb"][name]["VmHWM"] for lv in fr.values())
            out.append(f"freeradius memory: VmHWM (peak) {hwm / 1024:.1f} MB")
    out.append(_accounting(res))
    out.append("")
    out.extend(target_lines(res))
    if res["proxy"].get("profile"):
        out.append("")
        prof = res["proxy"]["profile"]
        out.append(f"profile of mfa-proxy (extra c={TARGET_CONCURRENCY} run, "
                   f"{prof['req_per_s_while_profiled']:,.0f} req/s while sampled; raw stacks "
                   f"in {prof['raw_file']}):")
        out.append(profile.render(prof))
    return "\n".join(out)


def _f(row: list[Any]) -> list[str]:
    cells = []
    for v in row:
        if isinstance(v, float):
            cells.append(fmt(v, 2 if abs(v) < 10 else (1 if abs(v) < 1000 else 0)))
        else:
            cells.append(fmt(v))
    return cells


def _accounting(res: dict[str, Any]) -> str:
    """What the proxy's own counters say about the requests: reasons, caches, drops."""
    reasons: dict[str, float] = {}
    other: dict[str, float] = {}
    for lv in res["proxy"]["levels"]:
        for k, v in lv.get("metrics_delta", {}).items():
            if k.startswith("requests_total{"):
                reasons[k] = reasons.get(k, 0) + v
            else:
                other[k] = other.get(k, 0) + v
    accepts = {k: v for k, v in reasons.items() if "result=accept" in k}
    not_fresh = {k: v for k, v in accepts.items() if "reason=ok" not in k}
    rejects = {k: v for k, v in reasons.items() if "result=accept" not in k}
    retrans = sum(v for k, v in other.items() if k.startswith("radius_retransmissions"))
    lines = ["mfa-proxy's own counters over the levels (warm-up included): "
             + ", ".join(f"{k.split('{', 1)[1].rstrip('}')} {v:,.0f}"
                         for k, v in sorted(reasons.items()))]
    lines.append(f"  accepts with a reason other than a fresh code: "
                 f"{sum(not_fresh.values()):,.0f}"
                 + (f" ({not_fresh})" if not_fresh else "")
                 + f"; rejects: {sum(rejects.values()):,.0f}"
                 + (f" ({rejects})" if rejects else ""))
    lines.append(f"  cache hits: 0 by construction -- no cache in the path (dn_cache_seconds = 0, "
                 f"users never repeat within a time step); duplicate-cache answers counted: "
                 f"{retrans:,.0f}; repeat-window accepts: "
                 f"{sum(v for k, v in accepts.items() if 'reason=repeat' in k):,.0f}")
    if other:
        lines.append("  other counters: " + ", ".join(f"{k} {v:,.0f}"
                                                     for k, v in sorted(other.items())))
    users = res["proxy"]
    lines.append(f"  users drawn {users['users_drawn']:,} ({users['users_reused']:,} of them "
                 "again in a later time step, with that step's code)")
    return "\n".join(lines)


def ok(met: bool) -> str:
    return "met" if met else "NOT met"


def target_lines(res: dict[str, Any]) -> list[str]:
    px = by_concurrency(res["proxy"]["levels"]).get(TARGET_CONCURRENCY)
    fr = by_concurrency(res.get("freeradius", {}).get("levels", [])).get(TARGET_CONCURRENCY)
    peak_mb = max([res["proxy"]["memory_kb_at_end"]["VmHWM"]]
                  + [lv["memory_kb"]["mfa-proxy"]["VmHWM"]
                     for lv in res["proxy"]["levels"]]) / 1024
    lines = [TARGET_TEXT]
    verdict: dict[str, Any] = {"rss_mb": peak_mb, "rss_met": peak_mb < TARGET_RSS_MB}
    if px is None:
        lines.append(f"  not measured: no c={TARGET_CONCURRENCY} level in this run")
        verdict["met"] = None
    elif fr is None:
        lines.append(f"  throughput and p99: not compared (no FreeRADIUS level at "
                     f"c={TARGET_CONCURRENCY}); proxy {px['req_per_s']:,.0f} req/s, "
                     f"p99 {px['p99_ms']:.2f} ms")
        lines.append(f"  RSS: {peak_mb:.1f} MB peak -> "
                     f"{ok(verdict['rss_met'])}")
        verdict["met"] = None
    else:
        r = px["req_per_s"] / fr["req_per_s"] if fr["req_per_s"] else math.nan
        verdict.update(throughput_ratio=r, throughput_met=r >= 1.0,
                       p99_ms=px["p99_ms"], freeradius_p99_ms=fr["p99_ms"],
                       p99_met=px["p99_ms"] <= fr["p99_ms"])
        verdict["met"] = verdict["throughput_met"] and verdict["p99_met"] and verdict["rss_met"]
        lines.append(f"  throughput: {px['req_per_s']:,.0f} / {fr['req_per_s']:,.0f} req/s = "
                     f"{r:.2f}x -> {ok(verdict['throughput_met'])}")
        lines.append(f"  p99: {px['p99_ms']:.2f} ms vs {fr['p99_ms']:.2f} ms -> "
                     f"{ok(verdict['p99_met'])}")
        lines.append(f"  RSS: {peak_mb:.1f} MB peak (VmHWM) -> {ok(verdict['rss_met'])}")
        lines.append(f"  => target {'MET' if verdict['met'] else 'NOT MET'}")
    res["target"] = verdict
    return lines


# ---------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                           check=False, timeout=10)
        return r.stdout.strip()

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "kernel": platform.release(),
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


Measure = Callable[[slapd.Directory, Path, list[Managed], dict[str, Any]], None]


def run_with_slapd(name: str, a: argparse.Namespace, measure: Measure,
                   report_of: Callable[[dict[str, Any], argparse.Namespace], str]) -> int:
    """What every benchmark does around its own measurements: a temp dir, a quiet
    machine check, the bench slapd, every process stopped by PID, the table on
    stdout, JSON in var/bench/<name>-<timestamp>.json. ``measure`` fills ``res``."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(a.json) if a.json else ROOT / "var" / "bench" / f"{name}-{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix=f"mfa-bench-{name}-"))
    res: dict[str, Any] = {"bench": name, "started": started, "environment": environment(),
                           "options": {k: v for k, v in vars(a).items() if k != "levels"}}
    procs: list[Managed] = []
    ok = False
    try:
        with stopping(procs):
            say(f"workdir {workdir}")
            busy = quiet_machine(a.wait_quiet)
            res["busy_cores_before"] = busy
            if busy >= 0.3:
                say(f"warning: {busy:.2f} cores busy with other work before the start: "
                    "figures will be low (see 'other cores')")
            directory = slapd.start(workdir / "slapd", a.users, a.slapd_threads)
            procs.append(directory.proc)
            res["slapd"] = {"users": a.users, "threads": a.slapd_threads}
            measure(directory, workdir, procs, res)
        text = report_of(res, a)
        ok = True
    except KeyboardInterrupt:
        say("interrupted; every process stopped")
        return 130
    except Exception as e:
        traceback.print_exc()
        say(f"the benchmark broke: {type(e).__name__}: {e}")
        say(f"logs kept in {workdir}")
        return 1
    finally:
        if ok and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"\nJSON: {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}"
          + (f"; temp dir kept: {workdir}" if a.keep else ""))
    return 0


def main(argv: list[str]) -> int:
    a = parse_args(argv)

    def measure(directory: slapd.Directory, workdir: Path, procs: list[Managed],
                res: dict[str, Any]) -> None:
        res["ceiling"] = ceiling(directory, a)
        if GROUP_ROWS[a.group_rows] or a.baseline_tree:
            res["proxy"], res["proxy_groups"] = run_with_group_rows(directory, workdir, a,
                                                                    procs)
        else:
            res["proxy"] = run_proxy(directory, workdir, a, procs)
            procs[-1].stop()  # the proxy: FreeRADIUS gets the machine to itself
        if not a.no_freeradius:
            res["freeradius"] = run_freeradius(directory, workdir, a, procs)
        else:
            res["freeradius"] = {"skipped": "--no-freeradius"}

    return run_with_slapd("radius", a, measure, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
