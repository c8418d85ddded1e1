"""Every metric, defined once. Labels are bounded: never a username or an address."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# mfa_proxy_users_enrollment_ending{within}: label -> seconds
ENROLLMENT_WINDOWS = {"1d": 86400, "3d": 3 * 86400, "7d": 7 * 86400}

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mfa_proxy_requests", "Authentication requests by protocol, client, result, reason",
            ["protocol", "client", "result", "reason"], registry=r)
        self.decision_seconds = Histogram(
            "mfa_proxy_decision_seconds", "Time from request to decision", ["protocol"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.radius_dropped = Counter(
            "mfa_proxy_radius_dropped", "RADIUS packets dropped without an answer, by reason",
            ["reason"], registry=r)
        self.radius_retransmissions = Counter(
            "mfa_proxy_radius_retransmissions", "Retransmissions answered from the duplicate cache",
            ["client"], registry=r)
        self.radius_accounting = Counter(
            "mfa_proxy_radius_accounting", "RADIUS Accounting-Requests answered", ["client"],
            registry=r)
        self.directory_seconds = Histogram(
            "mfa_proxy_directory_seconds", "Directory password checks", buckets=LATENCY_BUCKETS,
            registry=r)
        self.directory_errors = Counter(
            "mfa_proxy_directory_errors", "Directory errors (not bad passwords)", ["reason"],
            registry=r)
        self.state_errors = Counter(
            "mfa_proxy_state_errors", "State store errors", ["operation"], registry=r)
        self.lockouts = Counter(
            "mfa_proxy_lockouts", "Accounts locked after too many failures", registry=r)
        self.ldap_connections = Gauge(
            "mfa_proxy_ldap_connections", "Open LDAP client connections", registry=r)
        self.ldap_forwarded = Counter(
            "mfa_proxy_ldap_forwarded", "LDAP operations forwarded upstream", ["operation"],
            registry=r)
        self.ldap_refused = Counter(
            "mfa_proxy_ldap_refused", "LDAP operations answered by the proxy, not forwarded",
            ["operation", "reason"], registry=r)
        self.ldap_upstream_errors = Counter(
            "mfa_proxy_ldap_upstream_errors", "LDAP upstream errors", ["reason"], registry=r)
        self.ldap_dropped = Counter(
            "mfa_proxy_ldap_dropped", "LDAP connections closed for bad input or limits",
            ["reason"], registry=r)
        self.users = Gauge(
            "mfa_proxy_users", "Users by MFA status", ["status"], registry=r)
        self.enrollment_ending = Gauge(
            "mfa_proxy_users_enrollment_ending",
            "Users in an enrollment period whose deadline comes within the window "
            "(not enrolled yet: locked out once it passes)", ["within"], registry=r)
        self.audit_dropped = Counter(
            "mfa_proxy_audit_dropped", "Audit rows dropped (state store unavailable)",
            registry=r)
        self.portal_setups = Counter(
            "mfa_proxy_portal_setups", "Key set-ups confirmed or refused in the portal",
            ["result"], registry=r)
        self.mail_sent = Counter(
            "mfa_proxy_mail_sent", "Mails accepted by the SMTP server, by event", ["event"],
            registry=r)
        self.mail_failed = Counter(
            "mfa_proxy_mail_failed", "Mail attempts that failed (and mails given up: "
            "gave_up), by reason", ["reason"], registry=r)
        self.mail_queue = Gauge(
            "mfa_proxy_mail_queue", "Mails waiting in the outbox (pending)", registry=r)
        self.up = Gauge("mfa_proxy_ready", "1 while the state store and directory answer",
                        registry=r)
        self.config_reloads = Counter(
            "mfa_proxy_config_reloads", "Config reloads (SIGHUP) by result: success, failure "
            "(the running config kept)", ["result"], registry=r)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.config_last_reload = Gauge(
            "mfa_proxy_config_last_reload_timestamp_seconds",
            "When the running config was loaded (start or last successful reload)", registry=r)


class EngineMetrics:
    """policy.engine.EngineEvents → Prometheus."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def lockout(self) -> None:
        self.m.lockouts.inc()

    def directory(self, seconds: float, error: str | None) -> None:
        self.m.directory_seconds.observe(seconds)
        if error:
            self.m.directory_errors.labels(error).inc()

    def state_error(self, operation: str) -> None:
        self.m.state_errors.labels(operation).inc()


class RadiusMetrics:
    """proxy.radius.events.RadiusEvents → Prometheus."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def request(self, client: str, result: str, reason: str) -> None:
        self.m.requests.labels("radius", client, result, reason).inc()

    def dropped(self, reason: str) -> None:
        self.m.radius_dropped.labels(reason).inc()

    def decision_seconds(self, seconds: float) -> None:
        self.m.decision_seconds.labels("radius").observe(seconds)

    def accounting(self, client: str) -> None:
        self.m.radius_accounting.labels(client).inc()

    def retransmission(self, client: str) -> None:
        self.m.radius_retransmissions.labels(client).inc()


class LdapMetrics:
    """proxy.ldap.events.LdapEvents → Prometheus. The children of the per-operation
    series are looked up once (``labels()`` costs microseconds, twice a bind)."""

    def __init__(self, m: Metrics) -> None:
        self.m = m
        self._binds: dict[tuple[str, str], Any] = {}
        self._forwarded: dict[str, Any] = {}
        self._decision_seconds = m.decision_seconds.labels("ldap")

    def connection_opened(self) -> None:
        self.m.ldap_connections.inc()

    def connection_closed(self) -> None:
        self.m.ldap_connections.dec()

    def bind(self, result: str, reason: str, seconds: float) -> None:
        child = self._binds.get((result, reason))
        if child is None:  # the labels are bounded (events.py), so is this
            child = self._binds[(result, reason)] = self.m.requests.labels(
                "ldap", "ldap", result, reason)
        child.inc()
        self._decision_seconds.observe(seconds)

    def forwarded(self, op_name: str) -> None:
        child = self._forwarded.get(op_name)
        if child is None:
            child = self._forwarded[op_name] = self.m.ldap_forwarded.labels(op_name)
        child.inc()

    def refused(self, op_name: str, reason: str) -> None:
        self.m.ldap_refused.labels(op_name, reason).inc()

    def upstream_error(self, reason: str) -> None:
        self.m.ldap_upstream_errors.labels(reason).inc()

    def dropped(self, reason: str) -> None:
        self.m.ldap_dropped.labels(reason).inc()


class PortalMetrics:
    """proxy.portal.site.PortalEvents → Prometheus: sign-ins count as requests
    with protocol="portal", like RADIUS and LDAP ones."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def request(self, result: str, reason: str) -> None:
        self.m.requests.labels("portal", "portal", result, reason).inc()

    def decision_seconds(self, seconds: float) -> None:
        self.m.decision_seconds.labels("portal").observe(seconds)

    def setup(self, result: str) -> None:
        self.m.portal_setups.labels(result).inc()

    def lockout(self) -> None:
        self.m.lockouts.inc()


class MailMetrics:
    """proxy.mail.sender.MailEvents → Prometheus."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def sent(self, event: str) -> None:
        self.m.mail_sent.labels(event).inc()

    def failed(self, reason: str) -> None:
        self.m.mail_failed.labels(reason).inc()

    def queue(self, pending: int) -> None:
        self.m.mail_queue.set(pending)
