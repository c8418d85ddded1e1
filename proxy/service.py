"""Wires config → core → listeners. The only module that reads the whole config."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.python.threadpool import ThreadPool

from policy.engine import Authenticator, GroupRequirement, Limits, PasswordCheck, PolicyEngine
from policy.keys import KeyFileError, KeyRing
from policy.schema import StoreError
from proxy.config import Settings
from proxy.directories import ldap_options, make_directory, username_rules
from proxy.logs import serve_handler
from proxy.metrics import EngineMetrics, Metrics
from proxy.state import open_store, totp_params
from proxy.worker import BatchWorkers

log = logging.getLogger("mfa_proxy")


class StartupError(Exception):
    pass


# What a reload (SIGHUP) swaps in for the next request, by section; every other
# setting that changed is logged as needing a restart (listeners, the state
# store...). [directory] is swapped whole (see DIRECTORY_DRAIN_SECONDS).
RELOADABLE: dict[str, frozenset[str]] = {
    "radius": frozenset({"clients", "reply", "mode", "separator",
                         "require_message_authenticator"}),
    "ldap": frozenset({"exempt", "bind_cache_seconds", "bind_cache_rules", "mfa", "separator",
                       "max_connections", "max_connections_per_source", "idle_timeout",
                       "unbound_timeout", "bind_timeout"}),
    "portal": frozenset({"public_url", "session_minutes"}),
    # The SMTP server, sender, retries, templates... for the next mail; the poll
    # interval is the loop's, set at start.
    "mail": frozenset({"host", "port", "security", "username", "password", "from_header",
                       "reminder_hours", "ca_file", "tls_verify", "timeout_seconds", "retry",
                       "claim_seconds", "batch", "templates", "templates_dir"}),
    "totp": frozenset({"digits", "period", "window"}),
    "service": frozenset({"shutdown_grace_seconds"}),  # read when a drain starts
}
RESTART_SECTIONS = ("state", "http", "radius", "ldap", "portal", "totp", "mail", "service")
# [directory] reloads whole: a new directory for the next request; the old one is
# closed this long after, when every request that was asking it has its answer.
DIRECTORY_DRAIN_SECONDS = 120.0


def needs_restart(running: Settings, new: Settings) -> list[str]:
    """The keys that changed but take effect only after a restart."""
    changed: list[str] = []
    for section in RESTART_SECTIONS:
        old_part, new_part = getattr(running, section), getattr(new, section)
        if (old_part is None) != (new_part is None):
            changed.append(f"[{section}] {'added' if old_part is None else 'removed'}")
        elif old_part is not None:
            changed += _changed_fields(section, old_part, new_part,
                                       RELOADABLE.get(section, frozenset()))
    return changed


def _changed_fields(prefix: str, old: Any, new: Any, hot: frozenset[str]) -> list[str]:
    import dataclasses

    changed = []
    for f in dataclasses.fields(old):
        if f.name in hot:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            changed += _changed_fields(f"{prefix}", a, b, frozenset())
        else:
            changed.append(f"{prefix}.{f.name}")
    return changed


def setup_logging(level: str, fmt: str = "text") -> None:
    """One line per record on standard error, text or JSON; control characters in
    a message (a client's User-Name with a newline in it) are escaped
    (proxy/logs.py)."""
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[serve_handler(fmt)],
                        force=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Twisted's own log events (and those of modules using twisted.logger) go to
    # the same handlers.
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    from proxy.logs import TwistedChatter

    twisted_log = logging.getLogger("twisted")
    if not any(isinstance(f, TwistedChatter) for f in twisted_log.filters):
        twisted_log.addFilter(TwistedChatter())
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")],
                                     redirectStandardIO=False)


# A flush holds the state thread, and every sign-in queued behind it, for as long
# as its rows take: at 0.25 s a busy proxy (~3,000 sign-ins/s) flushed ~750 rows,
# a stall of several ms four times a second, in every request's tail.
AUDIT_FLUSH_SECONDS = 0.05

# The report thread's scans (users by status: ~90 ms over 100,000 users, every
# 30 s) and WAL checkpoints can wait; sign-ins cannot. Sharing a CPU with the
# reactor or the state thread (always, with [service] cpu_affinity = [N]), a
# thread at this nice value gets ~1/10 of it while they are busy.
BACKGROUND_NICE = 10


def background_priority() -> int | None:
    """Lower the calling thread's own scheduling priority (Linux: each thread has
    its own nice value); its new nice value, or None where that is not possible."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid),
                                                 BACKGROUND_NICE))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError):  # not Linux, or not allowed
        return None


class Service:
    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings, self.reactor = settings, reactor
        self.metrics = Metrics()
        self.ports: list[Any] = []
        self.loops: list[LoopingCall] = []
        self.pools: list[ThreadPool] = []
        # Listeners that stop taking new work as soon as the process drains
        # (RADIUS auth ports stay open until the decisions in flight are answered).
        self.intake_ports: list[Any] = []
        self.radius: Any = None
        self.ldap: Any = None
        self.draining = False
        self.in_flight = 0  # decisions asked of the core and not answered yet
        self._idle: Deferred[None] | None = None  # fires when in_flight drops to 0
        self._drained: Deferred[None] | None = None

    # -- building ---------------------------------------------------------------------

    def _pool(self, name: str, size: int) -> ThreadPool:
        pool = ThreadPool(minthreads=1, maxthreads=size, name=name)
        pool.start()
        self.pools.append(pool)
        return pool

    def build(self) -> None:
        s = self.settings
        try:
            self.store = open_store(s.state, background_checkpoints=True)
        except StoreError as e:
            raise StartupError(str(e)) from None
        try:
            self.keys = KeyRing(s.state.key_file)
        except KeyFileError as e:
            raise StartupError(str(e)) from None
        # SQLite has one writer at a time: several threads would only wait on its
        # busy handler (which sleeps); PostgreSQL takes the configured threads.
        threads = 1 if self.store.dialect == "sqlite" else s.state.threads
        # SQLite: the engine's steps that wait together share one transaction and
        # one commit (a commit costs more than the statement it ends). PostgreSQL
        # commits per step: grouped row locks of several threads could deadlock.
        group = self.store.hot.group if self.store.dialect == "sqlite" else None
        self.state_workers = BatchWorkers(self.reactor, threads, "state", group,
                                          (StoreError,))
        self.state_workers.start()
        # Reads that scan (users by status: ~90 ms over 100,000 users) get a thread
        # of their own, so sign-ins never queue behind them (SQLite WAL and
        # PostgreSQL both let a reader run beside the writer).
        self.report_workers = BatchWorkers(self.reactor, 1, "state-reports")
        self.report_workers.start()
        self.report_workers.submit(background_priority)
        self.async_directory = self._async_directory()
        self.engine = PolicyEngine(
            self.store, self.keys, totp_params(s.totp),
            Limits(s.policy.max_failures, s.policy.lockout_seconds), username_rules(s.directory),
            clock=time.time, events=EngineMetrics(self.metrics),
            repeat_key=self.keys.derive(b"repeat-window"),
            repeat_windows=_repeat_windows(s),
            log_accepts=s.log_decisions == "all",
            enrollment_url=s.portal.public_url if s.portal else "",
            enrollment_help=s.policy.enrollment_help,
            recovery_codes=s.policy.recovery_codes,
            group_requirement=_group_requirement(s),
            account_events=self._sign_in_events())
        self.authenticator = Authenticator(self.engine, self.async_directory,
                                           self.state_workers.submit_grouped,
                                           call_later=self.reactor.callLater,
                                           run_alone=self.state_workers.submit)

    def _sign_in_events(self) -> Any:
        """Who hears of a requirement a sign-in starts ([policy] require_groups):
        the outbox, as for `user require` (None without [mail])."""
        from proxy.state import mail_events

        return mail_events(self.settings, self.store, origin="a sign-in (require_groups)")

    def _async_directory(self, settings: Any = None) -> Any:
        """LDAP gets the Twisted-native client (no thread per request); the
        local file runs its argon2 checks in the directory pool (one pool,
        kept across reloads)."""
        d = settings or self.settings.directory
        if d.type == "ldap":
            # Not ldap3 (the admin commands' client): serve never needs it.
            from backends.ldap_async import AsyncLdapDirectory

            return AsyncLdapDirectory(ldap_options(d), self.reactor)
        from backends.threaded import ThreadedDirectory

        if getattr(self, "directory_pool", None) is None:
            self.directory_pool = self._pool("directory", 16)
        return ThreadedDirectory(make_directory(d), self.reactor, self.directory_pool)

    def _directory_lookup(self, name: str) -> Deferred[Any]:
        """The directory of now (a reload may have swapped it)."""
        return self.async_directory.lookup(name)  # type: ignore[no-any-return]

    def in_state_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return self.state_workers.submit(f, *args)

    def authenticate(self, request: Any) -> Deferred[Any]:
        """The core, as every front-end calls it, counting the decisions in flight
        (a drain waits for them)."""
        self.in_flight += 1
        d: Deferred[Any] = self.authenticator.authenticate(request)
        d.addBoth(self._answered)
        return d

    def start_sign_in(self, request: Any) -> Deferred[Any]:
        """The core's phased entry point (the LDAP front-end makes the password
        check itself), counted in flight until the sign-in ends: at once for a
        decision, else once its password check is finished or abandoned."""
        self.in_flight += 1
        d: Deferred[Any] = self.authenticator.start(request)
        d.addCallbacks(self._started, self._answered)
        return d

    def _started(self, answer: Any) -> Any:
        if isinstance(answer, PasswordCheck):
            answer.decided.addBoth(self._answered)
        else:
            self._answered(answer)
        return answer

    def _answered(self, result: Any) -> Any:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            idle, self._idle = self._idle, None
            # Next turn of the reactor: the front-end's own callbacks (after this
            # one) have written the answer by then.
            self.reactor.callLater(0, idle.callback, None)
        return result

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        self.build()
        self.started_settings = self.settings  # what the listeners were built from
        self.metrics.config_last_reload.set(time.time())
        # Often, so each flush is short: the writer thread holds up sign-ins meanwhile
        # (~4 µs a row alone, more under load: each row's step hands the GIL over).
        self._every(AUDIT_FLUSH_SECONDS, self._flush_audit)
        # now=True: /metrics shows the users by status from the first scrape, not
        # only 30 s after a start.
        self._every(30.0, self._refresh_user_gauge, now=True)
        self._every(3600.0, self._prune)
        if self.store.dialect == "sqlite":
            self._every(1.0, self._checkpoint)
        self._listen_http()
        self._listen_radius()
        self._listen_ldap()
        self._listen_portal()
        self._start_mail()
        self._probe_directory()
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    def _probe_directory(self) -> None:
        """Say at start whether the directory answers: a directory that is down is
        a warning, not a reason to stop (serve answers, /readyz says 503, and
        sign-ins are refused as directory_unavailable until it is back)."""
        from proxy.http.server import readable_problem

        def down(failure: Any) -> None:
            why = readable_problem("directory", failure.getErrorMessage()).partition(": ")[2]
            log.warning("the directory does not answer at start-up (%s); serving anyway: "
                        "sign-ins are refused until it does", why)

        d = self.async_directory.ping()
        d.addCallbacks(lambda _: log.info("the directory answers"), down)

    def _every(self, seconds: float, f: Any, now: bool = False) -> None:
        loop = LoopingCall(f)
        loop.clock = self.reactor
        loop.start(seconds, now=now).addErrback(
            lambda fail: log.error("periodic task failed: %s", fail.getErrorMessage()))
        self.loops.append(loop)

    def _flush_audit(self) -> Deferred[Any]:
        dropped = self.engine.audit.take_dropped()
        if dropped:
            self.metrics.audit_dropped.inc(dropped)
            log.warning("%d audit row(s) dropped: the state store is not keeping up", dropped)
        d = self.in_state_thread(self.engine.audit.flush)
        d.addErrback(lambda f: log.warning("audit flush failed: %s", f.getErrorMessage()))
        return d

    def _refresh_user_gauge(self) -> Deferred[Any]:
        from proxy.metrics import ENROLLMENT_WINDOWS

        def count(now: float) -> tuple[dict[str, int], dict[int, int]]:
            return (self.store.admin.count_by_status(now),
                    self.store.admin.count_enrollment_ending(
                        now, list(ENROLLMENT_WINDOWS.values())))

        d = self.report_workers.submit(count, time.time())

        def publish(counts: tuple[dict[str, int], dict[int, int]]) -> None:
            by_status, ending = counts
            for status, n in by_status.items():
                self.metrics.users.labels(status).set(n)
            for label, seconds in ENROLLMENT_WINDOWS.items():
                self.metrics.enrollment_ending.labels(label).set(ending[seconds])

        d.addCallback(publish)
        d.addErrback(lambda f: log.warning("user count failed: %s", f.getErrorMessage()))
        return d

    def _user_gauge_soon(self, delay: float = 0.2) -> None:
        """Recount the users by status shortly (reactor thread): after an account
        change made in this process (the portal), once its transaction is
        committed; several changes close together make one recount. A change
        made by the admin CLI (another process) shows at the next periodic count
        (every 30 s)."""
        if getattr(self, "_gauge_pending", None) is not None:
            return
        self._gauge_pending = self.reactor.callLater(delay, self._user_gauge_now)

    def _user_gauge_now(self) -> None:
        self._gauge_pending = None
        self._refresh_user_gauge()

    def _checkpoint(self) -> Deferred[Any]:
        d = self.report_workers.submit(self.store.checkpoint)
        d.addErrback(lambda f: log.warning("WAL checkpoint failed: %s", f.getErrorMessage()))
        return d

    def _prune(self) -> Deferred[Any]:
        d = self.in_state_thread(self.store.admin.prune, time.time(),
                                 self.settings.policy.audit_days)
        d.addErrback(lambda f: log.warning("prune failed: %s", f.getErrorMessage()))
        return d

    def ready(self) -> Deferred[list[str]]:
        """Problems that make this instance not ready (empty list: ready)."""
        if self.draining:  # a load balancer stops sending at once
            return succeed(["shutting down: draining"])

        def store_ok() -> None:
            self.store.ping()

        from proxy.http.server import readable_problem

        checks = [self.in_state_thread(store_ok), self.async_directory.ping()]
        names = ["state store", "directory"]
        results = [d.addCallbacks(lambda _: None,
                                  lambda f, n=n: readable_problem(n, f.getErrorMessage()))
                   for d, n in zip(checks, names, strict=True)]
        d = gatherResults(results)
        d.addCallback(lambda rs: [r for r in rs if r])

        def gauge(problems: list[str]) -> list[str]:
            self.metrics.up.set(0 if problems else 1)
            return problems

        d.addCallback(gauge)
        return d

    def _listen_http(self) -> None:
        addr = self.settings.http.listen
        if addr is None:
            return
        from proxy.http.server import make_site

        site = make_site(self.metrics.registry, self.ready, self.settings.http.admin_networks)
        self.ports.append(self.reactor.listenTCP(addr.port, site, interface=addr.host))
        log.info("http listening on %s (/metrics /healthz /readyz)", addr)

    def _listen_radius(self) -> None:
        r = self.settings.radius
        if r is None or not (r.listen or r.accounting_listen):
            return
        from proxy.metrics import RadiusMetrics
        from proxy.radius.clients import ClientTable
        from proxy.radius.packet import load_dictionary
        from proxy.radius.server import RadiusServer, ServerSettings

        clients = ClientTable(r.clients)
        server = RadiusServer(
            clients, self.authenticate,
            load_dictionary(str(r.dictionary) if r.dictionary else None),
            events=RadiusMetrics(self.metrics), clock=self.reactor,
            settings=ServerSettings(challenge_timeout=r.challenge_timeout,
                                    duplicate_window=r.duplicate_window, reply_rules=r.reply))
        self.radius = server
        self.ports += server.listen(self.reactor, [(a.host, a.port) for a in r.listen])
        accounting = server.listen(self.reactor, (),
                                   [(a.host, a.port) for a in r.accounting_listen])
        self.ports += accounting
        self.intake_ports += accounting
        log.info("radius listening on %s (accounting %s), %d client(s)",
                 ", ".join(map(str, r.listen)) or "-",
                 ", ".join(map(str, r.accounting_listen)) or "-", len(r.clients))

    def _listen_ldap(self) -> None:
        lset = self.settings.ldap
        if lset is None or not (lset.listen or lset.ldaps_listen):
            return
        from proxy.ldap.server import LdapProxyFactory
        from proxy.metrics import LdapMetrics

        config = lset  # parsed by the config loader into the front-end's own type
        try:
            factory = LdapProxyFactory(config, self.start_sign_in,
                                       events=LdapMetrics(self.metrics), reactor=self.reactor)
        except ValueError as e:
            raise StartupError(f"ldap: {e}") from None
        self.ldap = factory
        ports = factory.listen()
        self.ports += ports
        self.intake_ports += ports
        log.info("ldap listening on %s%s, upstream %s",
                 ", ".join(map(str, lset.listen)) or "-",
                 f" (ldaps {', '.join(map(str, lset.ldaps_listen))})" if lset.ldaps_listen
                 else "", lset.upstream)

    def _listen_portal(self) -> None:
        p = self.settings.portal
        if p is None:
            return
        from policy.sessions import LoginCsrf, PortalSessions
        from proxy.metrics import PortalMetrics
        from proxy.portal.pages import Branding
        from proxy.portal.site import Portal
        from proxy.state import make_accounts

        s = self.settings
        from proxy.state import mail_events

        events = UsersChanged(mail_events(s, self.store, origin="the self-service portal"),
                              lambda: self.reactor.callFromThread(self._user_gauge_soon))
        portal = Portal(
            self.authenticate, make_accounts(s, self.store, self.keys, events=events),
            PortalSessions(self.store, p.session_minutes * 60),
            LoginCsrf(self.keys.derive(b"portal-login-csrf")), self.in_state_thread,
            Branding(s.totp.issuer, s.totp.digits, s.totp.period), tls=p.tls,
            events=PortalMetrics(self.metrics))
        self.portal = portal
        site = portal.site()
        if p.tls:
            from backends.ldapwire.tls import server_options

            try:
                options = server_options(str(p.cert_file), str(p.key_file))
            except Exception as e:  # unreadable or not PEM
                raise StartupError(f"portal: cert_file/key_file: {e}") from None
            port = self.reactor.listenSSL(p.listen.port, site, options, interface=p.listen.host)
        else:
            port = self.reactor.listenTCP(p.listen.port, site, interface=p.listen.host)
        self.ports.append(port)
        self.intake_ports.append(port)
        log.info("portal listening on %s (%s)%s", p.listen, "https" if p.tls else "http",
                 f", public URL {p.public_url}" if p.public_url else "")

    # -- reloading (SIGHUP) -------------------------------------------------------------

    def reload(self) -> bool:
        """Read the config file again and apply it, all or nothing.

        A file that does not validate (every check ``check-config`` runs) is
        refused whole: the running config stays, and the log says why. Else
        RADIUS clients and secrets, reply rules, policy limits, TOTP checks,
        the LDAP exempt list and bind-cache windows, logging and the portal's
        public URL apply from the next request on; requests in flight finish
        as they started, open LDAP and portal sessions stay. Anything else
        that changed (listen addresses, the state store...) is
        logged as needing a restart."""
        from proxy import config as configmod

        path = self.settings.path
        try:
            new = configmod.load_checked(path)
            self._apply(new)
        except configmod.ConfigError as e:
            return self._reload_refused(path, e.problems)
        except (ValueError, StartupError) as e:
            return self._reload_refused(path, [str(e)])
        except Exception as e:  # a bug: still never half-applied, see _apply
            log.exception("reload of %s failed", path)
            return self._reload_refused(path, [f"{type(e).__name__}: {e}"])
        for warning in new.warnings:
            log.warning("config warning: %s", warning)
        later = needs_restart(self.started_settings, new)
        for key in later:
            log.warning("reload: %s changed: takes effect only after a restart", key,
                        extra={"event": "reload"})
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload.set(time.time())
        log.info("config reloaded from %s%s", path,
                 f" ({len(later)} change(s) wait for a restart)" if later else "",
                 extra={"event": "reload", "result": "success"})
        return True

    def _reload_refused(self, path: Any, problems: list[str]) -> bool:
        self.metrics.config_reloads.labels("failure").inc()
        for problem in problems:
            log.error("reload refused, the running config is kept: %s", problem,
                      extra={"event": "reload", "result": "failure"})
        log.error("reload of %s refused (%d problem(s)); still running the config loaded "
                  "before", path, len(problems), extra={"event": "reload", "result": "failure"})
        return False

    def _apply(self, new: Settings) -> None:
        """Swap in what can be swapped. The only steps that can fail (building the
        RADIUS client table and encoding its reply attributes) come first and
        swap nothing until they have all succeeded; the rest are assignments."""
        directory = None
        if new.directory != self.settings.directory:  # built before anything is swapped
            directory = (self._async_directory(new.directory), username_rules(new.directory))
        if self.radius is not None and new.radius is not None:
            from proxy.radius.clients import ClientTable

            self.radius.reconfigure(ClientTable(new.radius.clients), new.radius.reply)
        if directory is not None:
            self._swap_directory(*directory)
        if self.ldap is not None and new.ldap is not None:
            self._reload_ldap(new.ldap)
        engine = self.engine
        limits = Limits(new.policy.max_failures, new.policy.lockout_seconds)
        engine.limits = engine.unknown_names.limits = limits
        engine.recovery_codes = new.policy.recovery_codes
        portal = getattr(self, "portal", None)
        if portal is not None:  # its set-ups make recovery codes, or not
            portal.accounts.recovery_codes = new.policy.recovery_codes
            if new.portal is not None:  # sessions find their next deadline by it
                portal.sessions.idle_seconds = new.portal.session_minutes * 60
        engine.totp = totp_params(new.totp)
        engine.log_accepts = new.log_decisions == "all"
        engine.repeat_windows = _repeat_windows(new)
        engine.group_requirement = _group_requirement(new)
        if new.portal is not None and self.settings.portal is not None:
            engine.enrollment_url = new.portal.public_url
        engine.enrollment_help = new.policy.enrollment_help
        mail = getattr(self, "mail", None)
        if mail is not None and new.mail is not None:
            from proxy.state import mail_context

            mail.config, mail.context = new.mail, mail_context(new)
        reconfigure_logging(new.log_level, new.log_format)
        self.settings = new

    def _swap_directory(self, directory: Any, usernames: Any) -> None:
        """Next requests ask the new directory; requests already under way finish
        on the old one, which is closed once they have had every chance to
        (DIRECTORY_DRAIN_SECONDS: longer than any directory timeout)."""
        old, self.async_directory = self.async_directory, directory
        self.authenticator.directory = directory
        self.engine.usernames = usernames
        closer = getattr(old, "close", None)
        if closer is not None:
            self.reactor.callLater(DIRECTORY_DRAIN_SECONDS, closer)
        log.info("reload: the directory settings changed: next sign-ins use the new ones",
                 extra={"event": "reload"})
        self._probe_directory()

    def _reload_ldap(self, new: Any) -> None:
        import dataclasses

        from proxy.ldap.dn import DnSuffixMap

        factory = self.ldap
        hot = {name: getattr(new, name) for name in RELOADABLE["ldap"]}
        exempt = DnSuffixMap((dn, True) for dn in new.exempt)
        windows = DnSuffixMap((r.dn, r.seconds) for r in new.bind_cache_rules)
        # Open sessions keep the mfa mode and separator they started with; the
        # exempt list and bind-cache windows are the factory's: every next bind.
        factory.config = dataclasses.replace(factory.config, **hot)
        factory.exempt, factory.cache_windows = exempt, windows

    # -- stopping -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT drain, then stop (a second one says so); SIGHUP reloads
        the config. Called once the reactor runs (it installs its own first)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signalled)

    def _signalled(self, signum: int, _frame: Any) -> None:
        self.reactor.callFromThread(self._on_signal, signal.Signals(signum).name)

    def _on_signal(self, name: str) -> None:
        if name == "SIGHUP":
            self.reload()
        elif self._drained is not None:
            log.warning("%s: already draining (at most %g s); SIGKILL stops at once", name,
                        self.settings.service.shutdown_grace_seconds)
        else:
            log.info("%s: shutting down", name, extra={"event": "shutdown"})
            self.reactor.stop()  # the "before shutdown" trigger drains first

    def _shutdown(self) -> Deferred[None]:
        """The reactor is stopping: drain, then stop the rest."""
        d = self.drain()
        d.addBoth(lambda _: self.stop())
        return d

    def drain(self) -> Deferred[None]:
        """Stop taking work and let the decisions in flight finish.

        At once: /readyz answers 503, new RADIUS requests and Status-Server
        get no answer (the NAS fails over), the LDAP, portal and accounting
        listeners close. Then, within ``[service] shutdown_grace_seconds``,
        every decision in flight is answered (and so audited); last, each open
        LDAP session is closed with a Notice of Disconnection."""
        if self._drained is not None:
            return self._drained
        self.draining = True
        self.metrics.up.set(0)
        grace = self.settings.service.shutdown_grace_seconds
        if self.radius is not None:
            self.radius.stop_accepting()
        for port in self.intake_ports:
            port.stopListening()
        log.info("draining: /readyz is 503, no new requests; waiting up to %g s for %d "
                 "decision(s) in flight", grace, self.in_flight, extra={"event": "drain"})
        started = time.monotonic()
        done: Deferred[None] = Deferred()
        self._drained = done
        if self.in_flight == 0:
            idle: Deferred[None] = succeed(None)
        else:
            idle = self._idle = Deferred()
        timer = self.reactor.callLater(grace, self._grace_over, done)

        def drained(_: Any) -> None:
            if done.called:  # the grace period ran out first
                return
            timer.cancel()
            log.info("drained in %.2f s: every decision answered",
                     time.monotonic() - started, extra={"event": "drain"})
            self._close_sessions().chainDeferred(done)

        idle.addCallback(drained)
        return done

    def _grace_over(self, done: Deferred[None]) -> None:
        log.warning("shutdown_grace_seconds (%g s) passed with %d decision(s) still in flight: "
                    "stopping anyway", self.settings.service.shutdown_grace_seconds,
                    self.in_flight, extra={"event": "drain"})
        self._idle = None
        self._close_sessions().chainDeferred(done)

    def _close_sessions(self, timeout: float = 2.0) -> Deferred[None]:
        """Close every LDAP session (a Notice of Disconnection, then the close of
        both sides); fires once they are closed, or ``timeout`` seconds later:
        the reactor's own shutdown would cut them before the notice is sent."""
        factory = self.ldap
        if factory is None or not factory.connections:
            return succeed(None)
        count = len(factory.connections)
        factory.disconnect_all()
        closed: Deferred[None] = Deferred()
        deadline = time.monotonic() + timeout

        def check() -> None:
            if not factory.connections or time.monotonic() > deadline:
                log.info("closed %d LDAP session(s)", count - len(factory.connections),
                         extra={"event": "drain"})
                closed.callback(None)
            else:
                self.reactor.callLater(0.02, check)

        check()
        return closed

    def _start_mail(self) -> None:
        """The sender loop over the outbox (proxy/mail/sender.py). SMTP runs in a
        thread of its own (daemon: a dead mail server never holds up a stop; the
        mail it was sending is sent again once its claim runs out)."""
        m = self.settings.mail
        if m is None:
            return
        from proxy.mail import smtp
        from proxy.mail.sender import MailSender
        from proxy.metrics import MailMetrics
        from proxy.state import mail_context

        self.mail_workers = BatchWorkers(self.reactor, 1, "mail")
        self.mail_workers.start()

        def send(to: str, message: Any) -> Deferred[Any]:
            # The sender's config of now: a reload may have changed the server.
            return self.mail_workers.submit(smtp.send, self.mail.config, to, message)

        self.mail = MailSender(m, self.store, mail_context(self.settings),
                               self.in_state_thread, self._directory_lookup, send,
                               time.time, MailMetrics(self.metrics))
        self._every(m.poll_seconds, self.mail.tick, now=True)
        log.info("mail via %s (%s), reminders %s", m.server, m.security,
                 f"{m.reminder_hours} h before the deadline" if m.reminder_hours else "off")

    def stop_threads(self) -> None:
        mail = getattr(self, "mail_workers", None)
        if mail is not None:
            mail.stop(timeout=1.0)  # a send under way is left to its claim
        for name in ("state_workers", "report_workers"):
            workers = getattr(self, name, None)
            if workers is not None:
                workers.stop()
        for pool in self.pools:
            pool.stop()

    def stop(self) -> Deferred[Any] | None:
        for loop in self.loops:
            if loop.running:
                loop.stop()
        self.stop_threads()  # queued state work is finished first
        try:
            self.engine.audit.flush()
        except Exception as e:
            log.warning("final audit flush failed: %s", e)
        closer = getattr(self.async_directory, "close", None)
        if closer is not None:
            closer()
        self.store.close()
        log.info("stopped")
        return None


class UsersChanged:
    """An AccountEvents listener around another (or none): passes every event on,
    then calls ``changed`` (which must be safe from any thread: it runs inside
    the change's transaction, on the state thread)."""

    def __init__(self, inner: Any, changed: Any) -> None:
        self.inner, self.changed = inner, changed

    def __getattr__(self, event: str) -> Any:
        handler = getattr(self.inner, event, None) if self.inner is not None else None

        def told(*args: Any, **kwargs: Any) -> None:
            if handler is not None:
                handler(*args, **kwargs)
            self.changed()

        return told


def _group_requirement(s: Settings) -> GroupRequirement:
    return GroupRequirement(s.policy.require_groups, s.policy.enrollment_days)


def _repeat_windows(s: Settings) -> bool:
    """Whether any resource has a repeat window (else failures skip clearing it)."""
    return any(c.repeat_window_seconds for c in (s.radius.clients if s.radius else ())) or bool(
        s.ldap and (s.ldap.bind_cache_seconds
                    or any(rule.seconds for rule in s.ldap.bind_cache_rules)))


def reconfigure_logging(level: str, fmt: str) -> None:
    """A reload's logging: the level, and text or JSON, of the running handler."""
    from proxy.logs import StderrHandler

    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    for handler in root.handlers:
        if isinstance(handler, StderrHandler):
            handler.setFormatter(serve_handler(fmt).formatter)


def pin_threads(cpus: tuple[int, ...]) -> None:
    """Every thread of this process on ``cpus`` (``[service] cpu_affinity``); the
    threads started later inherit it from the one that starts them."""
    import os
    from contextlib import suppress

    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    for task in tasks:
        with suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(task, cpus)


def run(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_format)
    for warning in settings.warnings:
        log.warning("config warning: %s", warning)
    if settings.service.cpu_affinity:
        cpus = ", ".join(map(str, settings.service.cpu_affinity))
        try:
            pin_threads(settings.service.cpu_affinity)
        except OSError as e:  # a seccomp filter (systemd's SystemCallFilter=~@resources)
            log.warning("[service] cpu_affinity: cannot run on CPU(s) %s (%s); running on "
                        "every CPU allowed. Under systemd set CPUAffinity=%s in the unit "
                        "instead (its system call filter refuses sched_setaffinity)",
                        cpus, e.strerror or e, cpus.replace(", ", " "))
        else:
            log.info("running on CPU(s) %s ([service] cpu_affinity)", cpus)
    from twisted.internet import reactor

    service = Service(settings, reactor)
    try:
        service.start()
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 1
    except Exception as e:  # e.g. a port already in use
        log.error("cannot start: %s: %s", type(e).__name__, e)
        service.stop_threads()
        return 1
    reactor.callWhenRunning(service.install_signal_handlers)  # type: ignore[attr-defined]
    log.info("mfa-proxy serving (config %s)", settings.path)
    reactor.run()  # type: ignore[attr-defined]
    return 0
