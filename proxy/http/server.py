"""/metrics, /healthz, /readyz over twisted.web."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

ReadyCheck = Callable[[], "Deferred[list[str]]"]


class Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class Ready(Resource):
    """200 only while the state store and the directory answer; else 503 + reasons."""

    isLeaf = True

    def __init__(self, check: ReadyCheck) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        d = self.check()
        d.addCallback(self._answer, request)
        d.addErrback(lambda f: self._answer([f"check failed: {f.getErrorMessage()}"], request))
        return NOT_DONE_YET

    @staticmethod
    def _answer(problems: list[str], request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if problems:
            request.setResponseCode(503)
            body = "not ready\n" + "".join(f"{p}\n" for p in problems)
        else:
            body = "ready\n"
        request.write(body.encode())
        request.finish()


class QuietSite(Site):
    """No access log line per request: Prometheus scrapes every few seconds."""

    def log(self, request: Request) -> None:
        pass


def make_site(registry: CollectorRegistry, ready: ReadyCheck) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Ready(ready))
    site = QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
