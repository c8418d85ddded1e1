"""/metrics, /healthz, /readyz over twisted.web."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

ReadyCheck = Callable[[], "Deferred[list[str]]"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AdminSources:
    """The clients allowed to see internal detail (directory URLs, error texts):
    loopback always, plus ``[http] admin_networks``.  Anyone else who can reach
    the port learns only ready or not."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)

    def allows(self, request: Request) -> bool:
        peer = request.getClientAddress()
        if not isinstance(peer, IPv4Address | IPv6Address):
            return False
        try:
            ip = ipaddress.ip_address(peer.host.split("%", 1)[0])  # no IPv6 zone
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
        return ip.is_loopback or any(ip.version == n.version and ip in n
                                     for n in self.networks)


# Twisted's words for what went wrong on a connection, in a person's (for /readyz).
_TRANSPORT_WORDS = (
    (re.compile(r"Connection was refused by other side: \d+: Connection refused\.?"),
     "connection refused"),
    (re.compile(r"TCP connection timed out: \d+: Connection timed out\.?"),
     "connection timed out"),
    (re.compile(r"User timeout caused connection failure\.?"), "connection timed out"),
    (re.compile(r"DNS lookup failed: [^;]*"), "host name not found"),
    (re.compile(r"No route to host: \d+: No route to host\.?"), "no route to host"),
    (re.compile(r"An error occurred while connecting: \d+: ([^;]*?)\.?$"), r"\1"),
    (re.compile(r"Connection to the other side was lost in a non-clean fashion[^;]*"),
     "connection lost"),
    (re.compile(r"Connection was closed cleanly\.?"), "connection closed"),
)
_URL = re.compile(r"(ldaps?://[^\s:;,()]+(?::\d+)?)")


def readable_problem(component: str, text: str) -> str:
    """``component: why`` as a person reads it: no transport internals
    (``Connection was refused by other side: 111: ...`` is "connection refused"),
    the component's name and each URL said once."""
    why = " ".join(text.split())
    for prefix in (f"{component} unavailable", f"{component}:"):
        if why.lower().startswith(prefix):
            why = why[len(prefix):].strip(" :")
            if why.startswith("(") and why.endswith(")"):
                why = why[1:-1]
    for pattern, words in _TRANSPORT_WORDS:
        why = pattern.sub(words, why)
    parts: dict[str, str] = {}
    for part in (p.strip() for p in why.split(";")):
        match = _URL.match(part)
        url = match.group(1) if match else ""
        said = _URL.sub("", part[len(url):]).strip(" :") if url else part
        if said.lower() not in parts.get(url, "").lower():
            parts[url] = f"{parts[url]}, {said}" if parts.get(url) else said
    return f"{component}: " + "; ".join(f"{url} {said}".strip() if url else said
                                        for url, said in parts.items())


class Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class Ready(Resource):
    """200 only while the state store and the directory answer; else 503.

    The reasons (which name internal URLs and errors) are in the body only for
    an admin source (:class:`AdminSources`); others get "not ready" alone.
    """

    isLeaf = True

    def __init__(self, check: ReadyCheck, admins: AdminSources | None = None) -> None:
        super().__init__()
        self.check = check
        self.admins = admins or AdminSources()

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        d = self.check()
        d.addCallback(self._answer, request)
        d.addErrback(lambda f: self._answer([f"check failed: {f.getErrorMessage()}"], request))
        return NOT_DONE_YET

    def _answer(self, problems: list[str], request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if problems:
            request.setResponseCode(503)
            body = "not ready\n"
            if self.admins.allows(request):
                body += "".join(f"{p}\n" for p in problems)
        else:
            body = "ready\n"
        request.write(body.encode())
        request.finish()


class QuietSite(Site):
    """No access log line per request: Prometheus scrapes every few seconds."""

    def log(self, request: Request) -> None:
        pass


def make_site(registry: CollectorRegistry, ready: ReadyCheck,
              admin_networks: Iterable[Network] = ()) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Ready(ready, AdminSources(admin_networks)))
    site = QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
