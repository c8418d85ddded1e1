"""Wires config → core → listeners. The only module that reads the whole config."""

from __future__ import annotations

import logging
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.python.threadpool import ThreadPool

from policy.engine import Authenticator, Limits, PolicyEngine
from policy.keys import KeyFileError, KeyRing
from policy.store import StoreError
from proxy.config import Settings
from proxy.directories import ldap_options, make_directory, username_rules
from proxy.logs import escaping_handler
from proxy.metrics import EngineMetrics, Metrics
from proxy.state import open_store, totp_params
from proxy.worker import BatchWorkers

log = logging.getLogger("mfa_proxy")


class StartupError(Exception):
    pass


def setup_logging(level: str) -> None:
    """One line per record on standard error; control characters in a message
    (a client's User-Name with a newline in it) are escaped (proxy/logs.py)."""
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[escaping_handler()])
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Twisted's own log events (and those of modules using twisted.logger) go to
    # the same handlers.
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")],
                                     redirectStandardIO=False)


class Service:
    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings, self.reactor = settings, reactor
        self.metrics = Metrics()
        self.ports: list[Any] = []
        self.loops: list[LoopingCall] = []
        self.pools: list[ThreadPool] = []

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
        group = self.store.group if self.store.dialect == "sqlite" else None
        self.state_workers = BatchWorkers(self.reactor, threads, "state", group,
                                          (StoreError,))
        self.state_workers.start()
        # Reads that scan (users by status: ~90 ms over 100,000 users) get a thread
        # of their own, so sign-ins never queue behind them (SQLite WAL and
        # PostgreSQL both let a reader run beside the writer).
        self.report_workers = BatchWorkers(self.reactor, 1, "state-reports")
        self.report_workers.start()
        self.async_directory = self._async_directory()
        self.engine = PolicyEngine(
            self.store, self.keys, totp_params(s.totp),
            Limits(s.policy.max_failures, s.policy.lockout_seconds), username_rules(s.directory),
            clock=time.time, events=EngineMetrics(self.metrics),
            repeat_key=self.keys.derive(b"repeat-window"),
            repeat_windows=any(c.repeat_window_seconds for c in
                               (s.radius.clients if s.radius else ())) or bool(
                s.ldap and (s.ldap.bind_cache_seconds
                            or any(rule.seconds for rule in s.ldap.bind_cache_rules))),
            log_accepts=s.log_decisions == "all",
            enrollment_url=s.portal.public_url if s.portal else "")
        self.authenticator = Authenticator(self.engine, self.async_directory,
                                           self.state_workers.submit_grouped,
                                           call_later=self.reactor.callLater)

    def _async_directory(self) -> Any:
        """LDAP gets the Twisted-native client (no thread per request); the
        local file runs its argon2 checks in the directory pool."""
        if self.settings.directory.type == "ldap":
            # Not ldap3 (the admin commands' client): serve never needs it.
            from backends.ldap_async import AsyncLdapDirectory

            return AsyncLdapDirectory(ldap_options(self.settings.directory), self.reactor)
        from backends.threaded import ThreadedDirectory

        self.directory_pool = self._pool("directory", 16)
        return ThreadedDirectory(make_directory(self.settings.directory), self.reactor,
                                 self.directory_pool)

    def in_state_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return self.state_workers.submit(f, *args)

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        self.build()
        # Often, so each flush is short: the writer thread holds up sign-ins meanwhile
        # (~12 µs a row).
        self._every(0.25, self._flush_audit)
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
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)

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
        d = self.report_workers.submit(self.store.count_by_status, time.time())

        def publish(counts: dict[str, int]) -> None:
            for status, n in counts.items():
                self.metrics.users.labels(status).set(n)

        d.addCallback(publish)
        d.addErrback(lambda f: log.warning("user count failed: %s", f.getErrorMessage()))
        return d

    def _checkpoint(self) -> Deferred[Any]:
        d = self.report_workers.submit(self.store.checkpoint)
        d.addErrback(lambda f: log.warning("WAL checkpoint failed: %s", f.getErrorMessage()))
        return d

    def _prune(self) -> Deferred[Any]:
        d = self.in_state_thread(self.store.prune, time.time(), self.settings.policy.audit_days)
        d.addErrback(lambda f: log.warning("prune failed: %s", f.getErrorMessage()))
        return d

    def ready(self) -> Deferred[list[str]]:
        """Problems that make this instance not ready (empty list: ready)."""

        def store_ok() -> None:
            self.store.ping()

        checks = [self.in_state_thread(store_ok), self.async_directory.ping()]
        names = ["state store", "directory"]
        results = [d.addCallbacks(lambda _: None, lambda f, n=n: f"{n}: {f.getErrorMessage()}")
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
            clients, self.authenticator.authenticate, load_dictionary(),
            events=RadiusMetrics(self.metrics), clock=self.reactor,
            settings=ServerSettings(challenge_timeout=r.challenge_timeout,
                                    duplicate_window=r.duplicate_window, reply_rules=r.reply))
        self.radius = server
        self.ports += server.listen(self.reactor, [(a.host, a.port) for a in r.listen],
                                    [(a.host, a.port) for a in r.accounting_listen])
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
            factory = LdapProxyFactory(config, self.authenticator.authenticate,
                                       events=LdapMetrics(self.metrics), reactor=self.reactor)
        except ValueError as e:
            raise StartupError(f"ldap: {e}") from None
        self.ldap = factory
        self.ports += factory.listen()
        self.reactor.addSystemEventTrigger("before", "shutdown", factory.disconnect_all)
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

        events = mail_events(s, self.store, origin="the self-service portal")
        portal = Portal(
            self.authenticator.authenticate,
            make_accounts(s, self.store, self.keys, events=events),
            PortalSessions(self.store, p.session_minutes * 60),
            LoginCsrf(self.keys.derive(b"portal-login-csrf")), self.in_state_thread,
            Branding(s.totp.issuer, s.totp.digits, s.totp.period), tls=p.tls,
            events=PortalMetrics(self.metrics))
        self.portal = portal
        site = portal.site()
        if p.tls:
            from proxy.ldap.tls import server_options

            try:
                options = server_options(str(p.cert_file), str(p.key_file))
            except Exception as e:  # unreadable or not PEM
                raise StartupError(f"portal: cert_file/key_file: {e}") from None
            self.ports.append(self.reactor.listenSSL(p.listen.port, site, options,
                                                     interface=p.listen.host))
        else:
            self.ports.append(self.reactor.listenTCP(p.listen.port, site,
                                                     interface=p.listen.host))
        log.info("portal listening on %s (%s)%s", p.listen, "https" if p.tls else "http",
                 f", public URL {p.public_url}" if p.public_url else "")

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
            return self.mail_workers.submit(smtp.send, m, to, message)

        self.mail = MailSender(m, self.store, mail_context(self.settings),
                               self.in_state_thread, self.async_directory.lookup, send,
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


def run(settings: Settings) -> int:
    setup_logging(settings.log_level)
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
    log.info("mfa-proxy serving (config %s)", settings.path)
    reactor.run()  # type: ignore[attr-defined]
    return 0
