"""/metrics, /healthz, /readyz over twisted.web."""

from __future__ import annotations

import ipaddress
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
