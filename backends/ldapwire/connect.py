"""Reaching a directory, for both of its clients: an endpoint and a one-connection factory.

The front-end opens an upstream connection per client connection and the
directory backend reconnects in outages, so both connect often: address
literals skip name resolution, and the factory is quiet (no "Starting
factory" line per connect).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Factory, Protocol


class OneConnection(Factory):
    """Hands one prepared protocol to an endpoint's connect."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._prepared = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 - Twisted's name
        return self._prepared


def client_endpoint(reactor: Any, host: str, port: int, timeout: float,
                    tls: Any = None) -> Any:
    """An IStreamClientEndpoint to ``host``:``port``, TLS from the first byte
    when ``tls`` (an IOpenSSLClientConnectionCreator) is given."""
    endpoint: Any
    if isIPAddress(host):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = endpoints.TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, host, port, timeout=timeout)
    else:
        endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls is not None:
        endpoint = endpoints.wrapClientTLS(tls, endpoint)
    return endpoint
