"""``scripts/bench ldap``: mfa-proxy's LDAP front-end against slapd itself.

One run, one machine, one slapd (:mod:`bench.slapd`, the RADIUS benchmark's):

(a) direct -- an application's workload straight to slapd from a raw-BER
    asyncio client (:func:`bench.ldapload.run_frontend`);
(b) through mfa-proxy -- ``mfa-proxy serve`` with an ``[ldap]`` front-end in
    front of the same slapd (every bench user enrolled with ``mfa-proxy user
    import``), the same workload with ``passNNNNN,<code>`` as bind password.

Workloads, each at every ``--concurrency`` (persistent connections, one
operation in flight on each), for ``--seconds`` after ``--warmup``, direct
then through the proxy, level by level:

``bind + search``  bind as the user, then a base search ``(uid=X)`` of the
                   user's own entry; every bind must answer
                   0 and every search that entry. Through the proxy no (user,
                   time step) pair is ever sent twice (the proxy refuses
                   replays): users come from :class:`bench.radiusload.UserPool`.
``search only``    one bind as the service account per connection (exempt in
                   the proxy: password only), then searches of random users:
                   the forwarding path alone.

It prints a table and the issue-4 target, writes JSON to
``var/bench/ldap-<timestamp>.json`` and exits 0 whatever the figures;
non-zero only when the benchmark itself broke. It is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import ldapload, profile, proxy, radiusload, slapd
from bench.common import (
    SVC_DN,
    SVC_PASSWORD,
    Managed,
    fmt,
    memory_kb,
    password,
    ratio,
    say,
    table,
    uid,
    user_dn,
)
from bench.radius import _f, bench_arguments, bench_defaults, run_with_slapd

ROOT = Path(__file__).resolve().parent.parent
TARGET_CONCURRENCY = 32
TARGET_RATIO = 0.5
TARGET_ADDED_P50_MS = 1.0
TARGET_RSS_MB = 100.0
TARGET_TEXT = ("TARGET (issue 4): at c=32 throughput through the proxy >= 0.5x direct slapd on "
               "the same workload, added p50 < 1 ms, RSS < 100 MB")
SEPARATOR = ","
WORKLOADS = (("bindsearch", "bind + search"), ("search", "search only"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    # 512: the proxy's max_connections is 1000, and the search-only runs hold as many
    ap = bench_arguments("ldap", "persistent connections", "bind + search")
    ap.description = __doc__
    ap.add_argument("--max-ops", type=int, default=5_000_000,
                    help="hard cap on operations per level")
    ap.add_argument("--proxy-cpus", default="", metavar="N[,N...]",
                    help="[service] cpu_affinity of the proxy: serve's threads on these CPUs "
                         "only")
    return bench_defaults(ap, ap.parse_args(argv), max_level=512)


# ---------------------------------------------------------------- credentials


class Direct:
    """Random users with their password: slapd has no replay to refuse."""

    def __init__(self, users: int, seed: int) -> None:
        self.rng, self.users = random.Random(seed), users

    def __call__(self, now: float) -> tuple[int, str]:
        i = self.rng.randint(1, self.users)
        return i, password(i)


class WithCodes:
    """``passNNNNN,<code>`` for a (user, time step) never handed out before."""

    def __init__(self, pool: radiusload.UserPool, codes: radiusload.Codes) -> None:
        self.pool, self.codes = pool, codes

    def __call__(self, now: float) -> tuple[int, str] | None:
        drawn = self.pool.draw(now)
        if drawn is None:
            return None
        i, step = drawn
        return i, f"{password(i)}{SEPARATOR}{self.codes.code(i, step)}"


# ---------------------------------------------------------------- the probe


async def _probe(directory: slapd.Directory, port: int, creds: WithCodes) -> dict[str, Any]:
    """Before any load: the workload works directly and through the proxy, and the proxy
    really asks for a code (a password alone and a replayed code are refused)."""
    out: dict[str, Any] = {}
    n = directory.users
    conn = await ldapload.connect(directory.host, directory.port)
    try:
        out["direct_bind"] = (await conn.bind(user_dn(n), password(n))).code
        out["direct_search"] = ldapload.check_entry(
            await conn.search(user_dn(n), ldapload.SCOPE_BASE, "uid", uid(n),
                              ldapload.ENTRY_ATTRIBUTES), user_dn(n)) or "ok"
    finally:
        conn.close()
    drawn = creds(time.time())
    if drawn is None:
        raise RuntimeError("user pool empty before the first bind")
    i, bind_password = drawn
    conn = await ldapload.connect("127.0.0.1", port)
    try:
        out["proxy_bind_with_code"] = (await conn.bind(user_dn(i), bind_password)).code
        out["proxy_search"] = ldapload.check_entry(
            await conn.search(user_dn(i), ldapload.SCOPE_BASE, "uid", uid(i),
                              ldapload.ENTRY_ATTRIBUTES), user_dn(i)) or "ok"
        out["proxy_replayed_code"] = (await conn.bind(user_dn(i), bind_password)).code
        out["proxy_password_only"] = (await conn.bind(user_dn(i), password(i))).code
        out["proxy_search_after_refusal"] = (await conn.search(
            user_dn(i), ldapload.SCOPE_BASE, "uid", uid(i),
            ldapload.ENTRY_ATTRIBUTES)).entries
        out["proxy_service_account"] = (await conn.bind(SVC_DN, SVC_PASSWORD)).code
    finally:
        conn.close()
    return out


def probe(directory: slapd.Directory, port: int, creds: WithCodes) -> dict[str, Any]:
    out = asyncio.run(asyncio.wait_for(_probe(directory, port, creds), timeout=60))
    if out["direct_bind"] != 0 or out["direct_search"] != "ok":
        raise RuntimeError(f"slapd: the workload does not work directly: {out}")
    if out["proxy_bind_with_code"] != 0 or out["proxy_search"] != "ok":
        raise RuntimeError(f"proxy: the workload does not work through the proxy: {out}")
    if out["proxy_service_account"] != 0:
        raise RuntimeError(f"proxy: the exempt service account cannot bind: {out}")
    problems = []
    if out["proxy_replayed_code"] != 49:
        problems.append(f"a replayed code got result {out['proxy_replayed_code']}, not 49")
    if out["proxy_password_only"] != 49:
        problems.append(f"a password without code got result {out['proxy_password_only']}, "
                        "not 49")
    if out["proxy_search_after_refusal"] != 0:
        problems.append("after a refused bind the session still saw the user's entry")
    out["problems"] = problems
    for p in problems:
        say(f"PRODUCT PROBLEM: {p}")
    return out


# ---------------------------------------------------------------- the levels


class Bench:
    def __init__(self, a: argparse.Namespace, directory: slapd.Directory, server: Managed,
                 config: proxy.ProxyConfig) -> None:
        self.a, self.directory, self.server, self.config = a, directory, server, config
        self.pool = radiusload.UserPool(directory.users, reuse=not a.no_reuse, seed=11)
        self.codes = radiusload.Codes()
        self.with_codes = WithCodes(self.pool, self.codes)
        self.watch = {"mfa-proxy": server.pid, "slapd": directory.pid}
        self.seed = 100
        self.last_rate = 0.0  # ops/s of the last bind + search level through the proxy

    def level(self, target: str, workload: str, c: int, seconds: float | None = None,
              warmup: float | None = None) -> ldapload.FrontendResult:
        a = self.a
        self.seed += 1
        through = target == "mfa-proxy"
        host, port = ("127.0.0.1", self.config.ldap_port) if through else (
            self.directory.host, self.directory.port)
        creds: ldapload.Credential = (self.with_codes if through
                                      else Direct(self.directory.users, self.seed))
        result = ldapload.run_frontend(
            target, workload, host, port, self.directory.users, creds, c,
            a.seconds if seconds is None else seconds, a.warmup if warmup is None else warmup,
            self.watch, ("mfa-proxy",), a.max_ops, seed=self.seed)
        self.server.check()  # a proxy that died is a broken benchmark, not a slow one
        self.directory.proc.check()
        return result

    def users_for(self, rate: float, seconds: float | None = None) -> None:
        """Before a bind level through the proxy: wait for the next time step when the
        pool would run dry (it brings back every user drawn so far, unless --no-reuse)."""
        a = self.a
        need = rate * (seconds if seconds is not None else a.warmup + a.seconds) * 1.2
        self.pool.refresh(time.time())
        if self.pool.left < need and self.pool.reuse:
            wait = self.pool.next_refill(time.time()) - time.time()
            say(f"mfa-proxy: {self.pool.left:,} users left, ~{need:,.0f} needed: waiting "
                f"{wait:.0f} s for the next time step to bring them back")
            time.sleep(max(0.0, wait))
            self.pool.refresh(time.time())

    def run(self) -> dict[str, Any]:
        scrape = lambda: proxy.metrics(self.config.http_port)  # noqa: E731
        out: dict[str, Any] = {"bindsearch": [], "search": []}
        for workload, label in WORKLOADS:
            for c in self.a.levels:
                if workload == "bindsearch":
                    if not self.pool.left and not self.pool.reuse:
                        say(f"no users left (--no-reuse); bind levels from c={c} skipped")
                        break
                    self.users_for(self.last_rate)
                pair = {}
                for target in ("slapd", "mfa-proxy"):
                    time.sleep(1.0)
                    before = scrape() if target == "mfa-proxy" else None
                    r = self.level(target, workload, c)
                    s = r.summary()
                    if before is not None:
                        s["metrics_delta"] = proxy.metrics_delta(before, scrape())
                    pair[target] = s
                    say(f"{label} {target} c={c}: {s['ops_per_s']:,.0f} ops/s, "
                        f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
                        f"failed {s['failed']}"
                        + (f" {s['failures']}" if s["failures"] else "")
                        + (f"; users ran out: measured over {s['seconds']:.1f} s"
                           if s["stopped_early"] else ""))
                if workload == "bindsearch":
                    self.last_rate = pair["mfa-proxy"]["ops_per_s"]
                out[workload].append({"concurrency": c, **pair})
        out["users_drawn"] = self.pool.drawn
        out["users_reused"] = self.pool.reused
        return out

    def profile(self) -> dict[str, Any]:
        a = self.a
        out_dir = ROOT / "var" / "bench"
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / f"profile-ldap-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        self.users_for(self.last_rate, self.a.profile_seconds + 0.5)
        say(f"profile: py-spy on pid {self.server.pid} for {a.profile_seconds:g} s at "
            f"c={TARGET_CONCURRENCY}, bind + search through the proxy")
        spy = profile.record(self.server.pid, a.profile_seconds, raw, gil=not a.profile_threads)
        with spy:
            time.sleep(1.0)  # py-spy attached
            r = self.level("mfa-proxy", "bindsearch", TARGET_CONCURRENCY,
                           seconds=a.profile_seconds, warmup=0.5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(timeout=a.profile_seconds + 30)
        if not raw.exists():
            raise RuntimeError(f"py-spy wrote nothing:\n{raw.with_suffix('.log').read_text()}")
        summary = profile.summarize(raw)
        summary["gil"] = not a.profile_threads
        summary["raw_file"] = str(raw.relative_to(ROOT))
        s = r.summary()
        summary["ops_per_s_while_profiled"] = s["ops_per_s"]
        summary["failed_while_profiled"] = s["failed"]
        return summary


# ---------------------------------------------------------------- the report


def added_ms(px: dict[str, Any], dr: dict[str, Any], key: str = "p50_ms") -> float | None:
    a, b = px.get(key), dr.get(key)
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return a - b


def peak_rss(res: dict[str, Any]) -> tuple[float, list[float]]:
    """(peak VmHWM, VmRSS after each proxy level) in MB."""
    hwm = [res["proxy"]["memory_kb_at_end"]["VmHWM"]]
    rss = []
    for workload, _ in WORKLOADS:
        for lv in res["levels"][workload]:
            m = lv["mfa-proxy"]["memory_kb"].get("mfa-proxy")
            if m:
                hwm.append(m["VmHWM"])
                rss.append(m["VmRSS"] / 1024)
    return max(hwm) / 1024, rss


def report(res: dict[str, Any], a: argparse.Namespace) -> str:
    out: list[str] = []
    env = res["environment"]
    out.append(f"mfa-proxy LDAP benchmark  {res['started']}  {env['cpus']} CPUs  "
               f"{a.users:,} users  {a.seconds:g} s per level after {a.warmup:g} s warm-up")
    out.append("")
    short = False
    for workload, label in WORKLOADS:
        what = ("bind as the user (through the proxy: passNNNNN,<code>, a fresh (user, time "
                "step) each time), then a base search (uid=X) of the user's own entry"
                if workload == "bindsearch" else
                "searches (uid=X) of random users, after one bind as the service account "
                "(exempt in the proxy) per connection: forwarding alone")
        tag = "(a)/(b)" if workload == "bindsearch" else "(c)"
        out.append(f"{tag} {label}: {what}; one persistent connection per worker")
        headers = ["c", "target", "ops/s", "p50 ms", "p99 ms", "bind p50 ms", "search p50 ms",
                   "failed", "proxy µs/op", "slapd µs/op", "client µs/op", "other cores",
                   "÷ direct", "+p50 ms"]
        rows = []
        for lv in res["levels"][workload]:
            c, dr, px = lv["concurrency"], lv["slapd"], lv["mfa-proxy"]
            for name, r in (("slapd", dr), ("mfa-proxy", px)):
                cpu = r["cpu_us_per_op"]
                through = name == "mfa-proxy"
                rate = _f([r["ops_per_s"]])[0] + ("*" if r["stopped_early"] else "")
                short = short or r["stopped_early"]
                rows.append([
                    str(c), name, rate, *_f([r["p50_ms"], r["p99_ms"]]),
                    *_f([r["bind_p50_ms"] if workload == "bindsearch" else None,
                         r["search_p50_ms"]]),
                    fmt(r["failed"]),
                    *_f([cpu.get("mfa-proxy") if through else None, cpu.get("slapd"),
                         cpu.get("loadgen"), r["other_cores"],
                         ratio(r["ops_per_s"], dr["ops_per_s"]) if through else None,
                         added_ms(px, dr) if through else None])])
        out.append(table(headers, rows, right=set(range(2, len(headers)))))
        out.append("")
    out.append("  µs/op: CPU (user+system, all threads) of that process per completed "
               "operation; client: the load generator (this process); other cores: CPU used "
               "by processes outside the bench; ÷ direct: ops/s through the proxy ÷ ops/s "
               "straight to slapd at the same c; +p50: p50 through the proxy − p50 direct")
    if short:
        out.append("  * the user pool ran out during this level: measured over the seconds "
                   "that had users (JSON: seconds); more --users for full levels")
    failures = _failures(res)
    if failures:
        out.append("  FAILED operations (every bind must answer 0 and every search the entry): "
                   + "; ".join(failures))
    out.append("")
    peak, rss = peak_rss(res)
    start = res["proxy"]["memory_kb_at_start"]
    out.append(f"mfa-proxy memory: VmHWM (peak) {peak:.1f} MB, VmRSS after each level "
               + ", ".join(f"{r:.1f}" for r in rss) + f" MB; at start {start['VmRSS'] / 1024:.1f}"
               f" MB ({start['processes']} process(es))")
    out.append(_accounting(res))
    probe_res = res["proxy"]["probe"]
    out.append("probe before the load: password alone -> "
               f"{probe_res['proxy_password_only']}, replayed code -> "
               f"{probe_res['proxy_replayed_code']}, entries seen after that refused bind -> "
               f"{probe_res['proxy_search_after_refusal']}, exempt service account -> "
               f"{probe_res['proxy_service_account']}"
               + ("" if not probe_res["problems"] else
                  "  PRODUCT PROBLEMS: " + "; ".join(probe_res["problems"])))
    out.append("")
    out.extend(target_lines(res))
    prof = res["proxy"].get("profile")
    if prof:
        out.append("")
        out.append(f"profile of mfa-proxy (extra c={TARGET_CONCURRENCY} bind + search run, "
                   f"{prof['ops_per_s_while_profiled']:,.0f} ops/s while sampled; raw stacks "
                   f"in {prof['raw_file']}):")
        out.append(profile.render(prof))
    return "\n".join(out)


def _failures(res: dict[str, Any]) -> list[str]:
    out = []
    for workload, label in WORKLOADS:
        for lv in res["levels"][workload]:
            for target in ("slapd", "mfa-proxy"):
                r = lv[target]
                extra = {k: r[k] for k in ("workers_gave_up", "workers_stuck") if r[k]}
                if r["failures"] or extra:
                    out.append(f"{label} {target} c={lv['concurrency']}: "
                               + ", ".join(f"{k} {v:,}" for k, v in
                                           {**r["failures"], **extra}.items()))
    return out


def _accounting(res: dict[str, Any]) -> str:
    """What the proxy's own counters say: bind results and reasons, forwarded operations."""
    totals: dict[str, float] = {}
    for workload, _ in WORKLOADS:
        for lv in res["levels"][workload]:
            for k, v in lv["mfa-proxy"].get("metrics_delta", {}).items():
                totals[k] = totals.get(k, 0) + v
    binds = {k.split("{", 1)[1].rstrip("}"): v for k, v in totals.items()
             if k.startswith("requests_total{")}
    forwarded = {k.split("operation=", 1)[1].rstrip("}"): v for k, v in totals.items()
                 if k.startswith("ldap_forwarded_total{")}
    other = {k: v for k, v in totals.items()
             if not k.startswith(("requests_total{", "ldap_forwarded_total{"))}
    not_fresh = {k: v for k, v in binds.items()
                 if "result=accept" in k and "reason=ok" not in k and "reason=exempt" not in k}
    lines = ["mfa-proxy's own counters over the levels (warm-up included): binds "
             + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(binds.items())) or "-")
             + "; forwarded " + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(forwarded.items()))
                                 or "-")]
    lines.append(f"  accepts with a reason other than a fresh code or exempt: "
                 f"{sum(not_fresh.values()):,.0f}" + (f" ({not_fresh})" if not_fresh else "")
                 + " (bind cache off: bind_cache_seconds = 0; no (user, step) sent twice)")
    if other:
        lines.append("  other counters: " + ", ".join(f"{k} {v:,.0f}"
                                                     for k, v in sorted(other.items())))
    lv = res["levels"]
    lines.append(f"  users bound through the proxy {lv['users_drawn']:,} ({lv['users_reused']:,} "
                 "of them again in a later time step, with that step's code)")
    return "\n".join(lines)


def ok(met: bool) -> str:
    return "met" if met else "NOT met"


def target_lines(res: dict[str, Any]) -> list[str]:
    level = next((lv for lv in res["levels"]["bindsearch"]
                  if lv["concurrency"] == TARGET_CONCURRENCY), None)
    peak, _ = peak_rss(res)
    lines = [TARGET_TEXT]
    verdict: dict[str, Any] = {"rss_mb": peak, "rss_met": peak < TARGET_RSS_MB}
    if level is None:
        lines.append(f"  throughput and latency: not measured (no c={TARGET_CONCURRENCY} level "
                     "in this run)")
        lines.append(f"  RSS: {peak:.1f} MB peak (VmHWM) -> {ok(verdict['rss_met'])}")
        verdict["met"] = None
        res["target"] = verdict
        return lines
    dr, px = level["slapd"], level["mfa-proxy"]
    r = ratio(px["ops_per_s"], dr["ops_per_s"])
    added = added_ms(px, dr)
    verdict.update(throughput_ratio=r, throughput_met=r is not None and r >= TARGET_RATIO,
                   added_p50_ms=added,
                   added_p50_met=added is not None and added < TARGET_ADDED_P50_MS,
                   proxy_failed=px["failed"])
    verdict["met"] = (verdict["throughput_met"] and verdict["added_p50_met"]
                      and verdict["rss_met"])
    lines.append(f"  throughput (bind + search): {px['ops_per_s']:,.0f} / {dr['ops_per_s']:,.0f} "
                 f"ops/s = {fmt(r, 2)}x -> {ok(verdict['throughput_met'])}")
    lines.append(f"  added p50: {px['p50_ms']:.2f} - {dr['p50_ms']:.2f} ms = "
                 f"{fmt(added, 2)} ms -> {ok(verdict['added_p50_met'])}")
    lines.append(f"  RSS: {peak:.1f} MB peak (VmHWM) -> {ok(verdict['rss_met'])}")
    fwd = next((lv for lv in res["levels"]["search"]
                if lv["concurrency"] == TARGET_CONCURRENCY), None)
    if fwd is not None:
        fr = ratio(fwd["mfa-proxy"]["ops_per_s"], fwd["slapd"]["ops_per_s"])
        verdict["search_only_ratio"] = fr
        verdict["search_only_added_p50_ms"] = added_ms(fwd["mfa-proxy"], fwd["slapd"])
        lines.append(f"  (search only, for reference: {fmt(fr, 2)}x, added p50 "
                     f"{fmt(verdict['search_only_added_p50_ms'], 2)} ms)")
    if px["failed"]:
        lines.append(f"  note: {px['failed']:,} operations through the proxy failed at this level")
    lines.append(f"  => target {'MET' if verdict['met'] else 'NOT MET'} (informational)")
    res["target"] = verdict
    return lines


# ---------------------------------------------------------------- main


def run_proxy(directory: slapd.Directory, workdir: Path, a: argparse.Namespace,
              procs: list[Managed], res: dict[str, Any]) -> None:
    pdir = workdir / "proxy"
    pdir.mkdir()
    config = proxy.write_config(pdir, directory.url, a.log_level, radius=False, ldap=True,
                                cpus=a.proxy_cpus)
    import_s = proxy.enroll_users(config, directory.users, pdir)
    server = proxy.start(config, pdir)
    procs.append(server)
    server.remember_children()
    say(f"proxy: serving, pid {server.pid}, LDAP 127.0.0.1:{config.ldap_port} -> "
        f"{directory.url}")
    bench = Bench(a, directory, server, config)
    res["proxy"] = {"import_seconds": import_s, "memory_kb_at_start": memory_kb(server.pid),
                    "config": config.path.read_text()}
    res["proxy"]["probe"] = probe(directory, config.ldap_port, bench.with_codes)
    res["levels"] = bench.run()
    res["proxy"]["memory_kb_at_end"] = memory_kb(server.pid)
    if a.profile:
        res["proxy"]["profile"] = bench.profile()


def main(argv: list[str]) -> int:
    a = parse_args(argv)

    def measure(directory: slapd.Directory, workdir: Path, procs: list[Managed],
                res: dict[str, Any]) -> None:
        run_proxy(directory, workdir, a, procs, res)

    return run_with_slapd("ldap", a, measure, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
